//! What confines a container as `docker run` does by default: its seccomp
//! profile, its device cgroup rules and its masked and read-only paths.
//!
//! Docker's seccomp profile is a template that the daemon resolves against
//! the container's capabilities and the host's architecture when it creates
//! the container; this is that profile resolved for the capabilities
//! [`crate::bundle`] grants (docker's default set, without `CAP_SYS_ADMIN`),
//! so a container cannot `unshare`, `mount`, `setns`, load modules or call
//! `bpf`, `keyctl` or `perf_event_open`. As since docker 25, io_uring is
//! not allowed: its operations are not checked by seccomp.

use std::str::FromStr;

use oci_spec::runtime::{
    Arch, LinuxDeviceCgroup, LinuxDeviceType, LinuxSeccomp, LinuxSeccompAction,
    LinuxSeccompArgBuilder, LinuxSeccompOperator, LinuxSyscall,
};

use crate::RuntimeError;

/// The network a container sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Network {
    /// The host's interfaces (`docker run --network host`): a server in the
    /// container is reachable at 127.0.0.1, and so is every loopback
    /// service of the host from inside it.
    #[default]
    Host,
    /// A network namespace of its own with only a loopback interface.
    None,
}

impl FromStr for Network {
    type Err = RuntimeError;

    fn from_str(s: &str) -> Result<Network, RuntimeError> {
        match s {
            "host" => Ok(Network::Host),
            "none" => Ok(Network::None),
            other => Err(RuntimeError::InvalidOption(format!(
                "--network {other:?}: expected host or none"
            ))),
        }
    }
}

/// `docker run --security-opt` as far as skiff follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SecurityOptions {
    /// Docker's default seccomp profile (`seccomp=unconfined` turns it off).
    pub seccomp: bool,
    /// The process and its children can never gain privileges, not even
    /// through setuid binaries (`no-new-privileges`).
    pub no_new_privileges: bool,
}

impl Default for SecurityOptions {
    fn default() -> Self {
        SecurityOptions {
            seccomp: true,
            no_new_privileges: false,
        }
    }
}

impl SecurityOptions {
    /// Applies one `--security-opt` value: `no-new-privileges[=true|false]`
    /// or `seccomp=unconfined`.
    pub fn apply(&mut self, option: &str) -> Result<(), RuntimeError> {
        let (key, value) = option
            .split_once(['=', ':'])
            .map_or((option, None), |(k, v)| (k, Some(v)));
        match (key, value) {
            ("no-new-privileges", None | Some("true")) => self.no_new_privileges = true,
            ("no-new-privileges", Some("false")) => self.no_new_privileges = false,
            ("seccomp", Some("unconfined")) => self.seccomp = false,
            _ => {
                return Err(RuntimeError::InvalidOption(format!(
                    "--security-opt {option:?}: expected no-new-privileges or seccomp=unconfined"
                )))
            }
        }
        Ok(())
    }
}

/// Paths docker masks (an empty file or directory is mounted over them):
/// what they show is the host's, and some of it helps an attacker (kernel
/// memory, keyrings, timer and scheduler state, power readings).
pub(crate) const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths docker mounts read-only: writing them changes the host's kernel.
pub(crate) const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Docker's device cgroup: nothing but the basic character devices may be
/// read or written; nodes of any kind may be created (`mknod` in an image
/// build), but not opened.
pub(crate) fn device_rules() -> Vec<LinuxDeviceCgroup> {
    let rule = |allow: bool,
                typ: LinuxDeviceType,
                major: Option<i64>,
                minor: Option<i64>,
                access: &str| {
        let mut rule = LinuxDeviceCgroup::default();
        rule.set_allow(allow)
            .set_typ(Some(typ))
            .set_major(major)
            .set_minor(minor)
            .set_access(Some(access.to_owned()));
        rule
    };
    use LinuxDeviceType::{A, B, C};
    let mut rules = vec![
        rule(false, A, None, None, "rwm"),
        rule(true, C, None, None, "m"),
        rule(true, B, None, None, "m"),
    ];
    // null, zero, full, random, urandom, tty, console, ptmx; the pts; tun.
    for (major, minor) in [
        (1, 3),
        (1, 5),
        (1, 7),
        (1, 8),
        (1, 9),
        (5, 0),
        (5, 1),
        (5, 2),
    ] {
        rules.push(rule(true, C, Some(major), Some(minor), "rwm"));
    }
    rules.push(rule(true, C, Some(136), None, "rwm"));
    rules.push(rule(true, C, Some(10), Some(200), "rwm"));
    rules
}

/// Calls every container may make, whatever its capabilities and architecture.
#[rustfmt::skip]
const ALLOWED: &[&str] = &[
    "accept", "accept4", "access", "adjtimex", "alarm", "bind", "brk", "capget", "capset",
    "chdir", "chmod", "chown", "chown32", "clock_adjtime", "clock_adjtime64", "clock_getres",
    "clock_getres_time64", "clock_gettime", "clock_gettime64", "clock_nanosleep",
    "clock_nanosleep_time64", "close", "close_range", "connect", "copy_file_range", "creat",
    "dup", "dup2", "dup3", "epoll_create", "epoll_create1", "epoll_ctl", "epoll_ctl_old",
    "epoll_pwait", "epoll_pwait2", "epoll_wait", "epoll_wait_old", "eventfd", "eventfd2",
    "execve", "execveat", "exit", "exit_group", "faccessat", "faccessat2", "fadvise64",
    "fadvise64_64", "fallocate", "fanotify_mark", "fchdir", "fchmod", "fchmodat", "fchown",
    "fchown32", "fchownat", "fcntl", "fcntl64", "fdatasync", "fgetxattr", "flistxattr", "flock",
    "fork", "fremovexattr", "fsetxattr", "fstat", "fstat64", "fstatat64", "fstatfs", "fstatfs64",
    "fsync", "ftruncate", "ftruncate64", "futex", "futex_time64", "futex_waitv", "futimesat",
    "getcpu", "getcwd", "getdents", "getdents64", "getegid", "getegid32", "geteuid", "geteuid32",
    "getgid", "getgid32", "getgroups", "getgroups32", "getitimer", "getpeername", "getpgid",
    "getpgrp", "getpid", "getppid", "getpriority", "getrandom", "getresgid", "getresgid32",
    "getresuid", "getresuid32", "getrlimit", "get_robust_list", "getrusage", "getsid",
    "getsockname", "getsockopt", "get_thread_area", "gettid", "gettimeofday", "getuid",
    "getuid32", "getxattr", "inotify_add_watch", "inotify_init", "inotify_init1",
    "inotify_rm_watch", "io_cancel", "ioctl", "io_destroy", "io_getevents", "io_pgetevents",
    "io_pgetevents_time64", "ioprio_get", "ioprio_set", "io_setup", "io_submit",
    "ipc", "kill", "landlock_add_rule",
    "landlock_create_ruleset", "landlock_restrict_self", "lchown", "lchown32", "lgetxattr",
    "link", "linkat", "listen", "listxattr", "llistxattr", "_llseek", "lremovexattr", "lseek",
    "lsetxattr", "lstat", "lstat64", "madvise", "membarrier", "memfd_create", "memfd_secret",
    "mincore", "mkdir", "mkdirat", "mknod", "mknodat", "mlock", "mlock2", "mlockall", "mmap",
    "mmap2", "mprotect", "mq_getsetattr", "mq_notify", "mq_open", "mq_timedreceive",
    "mq_timedreceive_time64", "mq_timedsend", "mq_timedsend_time64", "mq_unlink", "mremap",
    "msgctl", "msgget", "msgrcv", "msgsnd", "msync", "munlock", "munlockall", "munmap",
    "name_to_handle_at", "nanosleep", "newfstatat", "_newselect", "open", "openat", "openat2",
    "pause", "pidfd_open", "pidfd_send_signal", "pipe", "pipe2", "pkey_alloc", "pkey_free",
    "pkey_mprotect", "poll", "ppoll", "ppoll_time64", "prctl", "pread64", "preadv", "preadv2",
    "prlimit64", "process_mrelease", "pselect6", "pselect6_time64", "pwrite64", "pwritev",
    "pwritev2", "read", "readahead", "readlink", "readlinkat", "readv", "recv", "recvfrom",
    "recvmmsg", "recvmmsg_time64", "recvmsg", "remap_file_pages", "removexattr", "rename",
    "renameat", "renameat2", "restart_syscall", "rmdir", "rseq", "rt_sigaction", "rt_sigpending",
    "rt_sigprocmask", "rt_sigqueueinfo", "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait",
    "rt_sigtimedwait_time64", "rt_tgsigqueueinfo", "sched_getaffinity", "sched_getattr",
    "sched_getparam", "sched_get_priority_max", "sched_get_priority_min", "sched_getscheduler",
    "sched_rr_get_interval", "sched_rr_get_interval_time64", "sched_setaffinity", "sched_setattr",
    "sched_setparam", "sched_setscheduler", "sched_yield", "seccomp", "select", "semctl",
    "semget", "semop", "semtimedop", "semtimedop_time64", "send", "sendfile", "sendfile64",
    "sendmmsg", "sendmsg", "sendto", "setfsgid", "setfsgid32", "setfsuid", "setfsuid32", "setgid",
    "setgid32", "setgroups", "setgroups32", "setitimer", "setpgid", "setpriority", "setregid",
    "setregid32", "setresgid", "setresgid32", "setresuid", "setresuid32", "setreuid",
    "setreuid32", "setrlimit", "set_robust_list", "setsid", "setsockopt", "set_thread_area",
    "set_tid_address", "setuid", "setuid32", "setxattr", "shmat", "shmctl", "shmdt", "shmget",
    "shutdown", "sigaltstack", "signalfd", "signalfd4", "sigprocmask", "sigreturn", "socketcall",
    "socketpair", "splice", "stat", "stat64", "statfs", "statfs64", "statx", "symlink",
    "symlinkat", "sync", "sync_file_range", "syncfs", "sysinfo", "tee", "tgkill", "time",
    "timer_create", "timer_delete", "timer_getoverrun", "timer_gettime", "timer_gettime64",
    "timer_settime", "timer_settime64", "timerfd_create", "timerfd_gettime", "timerfd_gettime64",
    "timerfd_settime", "timerfd_settime64", "times", "tkill", "truncate", "truncate64",
    "ugetrlimit", "umask", "uname", "unlink", "unlinkat", "utime", "utimensat",
    "utimensat_time64", "utimes", "vfork", "vmsplice", "wait4", "waitid", "waitpid", "write",
    "writev",
    // Docker allows these on kernels from 4.8, whose seccomp checks a
    // ptrace'd process's calls again after the tracer changed them.
    "process_vm_readv", "process_vm_writev", "ptrace",
    // CAP_SYS_CHROOT is in the default set.
    "chroot",
    // Newer than the profile above: glibc 2.39 calls fchmodat2 and falls
    // back only on ENOSYS, so EPERM would break chmod -h, tar and Python.
    "fchmodat2", "cachestat", "map_shadow_stack",
];

/// Per architecture: the calls allowed there, and the architectures the
/// filter covers (a 64-bit host also runs its 32-bit binaries).
fn architecture() -> (&'static [&'static str], Vec<Arch>) {
    match std::env::consts::ARCH {
        "x86_64" => (
            &["arch_prctl", "modify_ldt"],
            vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32],
        ),
        "x86" => (&["modify_ldt"], vec![Arch::ScmpArchX86]),
        "aarch64" | "arm" => (
            &[
                "arm_fadvise64_64",
                "arm_sync_file_range",
                "sync_file_range2",
                "breakpoint",
                "cacheflush",
                "set_tls",
            ],
            vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm],
        ),
        "riscv64" => (&["riscv_flush_icache"], vec![Arch::ScmpArchRiscv64]),
        _ => (&[], Vec::new()),
    }
}

/// `clone` flags that make new namespaces: without CAP_SYS_ADMIN a
/// container may clone threads and processes, not namespaces.
const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;
/// AF_VSOCK: docker keeps containers off the host's vsock.
const AF_VSOCK: u64 = 40;
/// The `personality` values docker allows: the default, UNAME26, READ_IMPLIES_EXEC
/// combinations (PER_LINUX32 for 32-bit builds) and the query.
const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];
const ENOSYS: u32 = 38;
const EPERM: u32 = 1;

/// Docker's default seccomp profile, resolved for the default capabilities
/// on this architecture: anything not allowed fails with EPERM.
pub(crate) fn seccomp_profile() -> LinuxSeccomp {
    let syscalls = |names: &[&str], action: LinuxSeccompAction| {
        let mut call = LinuxSyscall::default();
        call.set_names(names.iter().map(|n| (*n).to_owned()).collect())
            .set_action(action);
        call
    };
    let arg = |index: usize, op: LinuxSeccompOperator, value: u64, value_two: Option<u64>| {
        let builder = LinuxSeccompArgBuilder::default()
            .index(index)
            .op(op)
            .value(value);
        match value_two {
            Some(two) => builder.value_two(two),
            None => builder,
        }
        .build()
        .expect("every field of a seccomp argument has a default")
    };
    let allow = LinuxSeccompAction::ScmpActAllow;
    let (arch_calls, architectures) = architecture();
    let mut rules = vec![syscalls(ALLOWED, allow), syscalls(arch_calls, allow)];

    let mut socket = syscalls(&["socket"], allow);
    socket.set_args(Some(vec![arg(
        0,
        LinuxSeccompOperator::ScmpCmpNe,
        AF_VSOCK,
        None,
    )]));
    rules.push(socket);
    for persona in PERSONALITIES {
        let mut personality = syscalls(&["personality"], allow);
        personality.set_args(Some(vec![arg(
            0,
            LinuxSeccompOperator::ScmpCmpEq,
            persona,
            None,
        )]));
        rules.push(personality);
    }
    // s390 passes the flags second; skiff does not run there.
    let mut clone = syscalls(&["clone"], allow);
    clone.set_args(Some(vec![arg(
        0,
        LinuxSeccompOperator::ScmpCmpMaskedEq,
        CLONE_NAMESPACE_FLAGS,
        Some(0),
    )]));
    rules.push(clone);
    // clone3's flags are behind a pointer that seccomp cannot read: ENOSYS
    // makes the C library fall back to clone, which is checked.
    let mut clone3 = syscalls(&["clone3"], LinuxSeccompAction::ScmpActErrno);
    clone3.set_errno_ret(Some(ENOSYS));
    rules.push(clone3);
    rules.retain(|rule| !rule.names().is_empty());

    let mut profile = LinuxSeccomp::default();
    profile
        .set_default_action(LinuxSeccompAction::ScmpActErrno)
        .set_default_errno_ret(Some(EPERM))
        .set_architectures((!architectures.is_empty()).then_some(architectures))
        .set_syscalls(Some(rules));
    profile
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_denies_what_needs_cap_sys_admin_and_allows_the_rest() {
        let profile = seccomp_profile();
        assert_eq!(profile.default_action(), LinuxSeccompAction::ScmpActErrno);
        let allowed: Vec<&String> = profile
            .syscalls()
            .iter()
            .flatten()
            .filter(|r| r.action() == LinuxSeccompAction::ScmpActAllow && r.args().is_none())
            .flat_map(|r| r.names())
            .collect();
        for denied in [
            "io_uring_setup",
            "unshare",
            "mount",
            "setns",
            "bpf",
            "keyctl",
            "init_module",
            "kexec_load",
        ] {
            assert!(!allowed.iter().any(|n| *n == denied), "{denied} allowed");
        }
        for needed in ["read", "execve", "openat", "chroot", "ptrace"] {
            assert!(allowed.iter().any(|n| *n == needed), "{needed} denied");
        }
        // Every name once: a typo repeated would hide a missing call.
        let mut names = ALLOWED.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALLOWED.len());
    }

    #[test]
    fn security_options_parse_as_docker_writes_them() {
        let mut options = SecurityOptions::default();
        options.apply("no-new-privileges").unwrap();
        assert!(options.no_new_privileges);
        options.apply("no-new-privileges=false").unwrap();
        assert!(!options.no_new_privileges);
        options.apply("no-new-privileges:true").unwrap();
        assert!(options.no_new_privileges);
        options.apply("seccomp=unconfined").unwrap();
        assert!(!options.seccomp);
        assert!(options.apply("seccomp=/etc/profile.json").is_err());
        assert!(options.apply("apparmor=x").is_err());
        assert_eq!("none".parse::<Network>().unwrap(), Network::None);
        assert!("bridge".parse::<Network>().is_err());
    }
}
