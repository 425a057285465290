//! The OCI runtime bundle (`config.json`) of a container, written from the
//! image's own config and the user's overrides, as `docker run` would.

use std::collections::HashSet;
use std::path::Path;

use oci_spec::runtime::{Capability, LinuxCapabilities, LinuxNamespaceType, Mount, Spec, User};
use serde::Deserialize;

use crate::confine::{
    device_rules, seccomp_profile, Network, SecurityOptions, MASKED_PATHS, READONLY_PATHS,
};
use crate::RuntimeError;

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the image says to run, from the `config` object of its OCI config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

#[derive(Deserialize)]
struct ImageConfigJson {
    #[serde(default)]
    config: Option<ExecConfigJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ExecConfigJson {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
}

impl ExecConfig {
    /// Reads the OCI (or Docker) image config JSON.
    pub fn from_image_config(json: &str) -> Result<ExecConfig, RuntimeError> {
        let parsed: ImageConfigJson =
            serde_json::from_str(json).map_err(|e| RuntimeError::ImageConfig(e.to_string()))?;
        let Some(config) = parsed.config else {
            return Ok(ExecConfig::default());
        };
        Ok(ExecConfig {
            entrypoint: config.entrypoint.unwrap_or_default(),
            cmd: config.cmd.unwrap_or_default(),
            env: config.env.unwrap_or_default(),
            working_dir: config.working_dir.filter(|d| !d.is_empty()),
            user: config.user.filter(|u| !u.is_empty()),
        })
    }
}

/// What the user asked for on top of the image's config.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Replaces the image's Cmd (the Entrypoint stays) when not empty.
    pub command: Vec<String>,
    /// Replaces the image's Entrypoint (an empty string clears it).
    pub entrypoint: Option<String>,
    /// `KEY=VALUE`, or `KEY` to pass this process's value on.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    /// `user[:group]`, by name or number.
    pub user: Option<String>,
    pub hostname: String,
    /// Give the container a terminal (stdin must be one).
    pub tty: bool,
    pub network: Network,
    pub security: SecurityOptions,
}

/// Writes `bundle/config.json` for a container whose root is `rootfs`, and
/// returns the process's arguments.
pub fn write_bundle(
    bundle: &Path,
    rootfs: &Path,
    image: &ExecConfig,
    options: &RunOptions,
) -> Result<Vec<String>, RuntimeError> {
    let args = command_line(image, options)?;
    let cwd = options
        .workdir
        .clone()
        .or_else(|| image.working_dir.clone())
        .unwrap_or_else(|| "/".to_owned());
    if !cwd.starts_with('/') {
        return Err(RuntimeError::InvalidOption(format!(
            "the working directory must be absolute, not {cwd:?}"
        )));
    }
    let user_spec = options.user.as_deref().or(image.user.as_deref());
    let user = match user_spec {
        Some(spec) => resolve_user(rootfs, spec)?,
        None => User::default(),
    };
    let mut env = merge_env(&image.env, &options.env);
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_owned());
    }
    set_env(&mut env, &format!("HOSTNAME={}", options.hostname));
    if options.tty && !env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=xterm".to_owned());
    }

    let mut spec = Spec::default();
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_terminal(Some(options.tty));
    process.set_args(Some(args.clone()));
    process.set_env(Some(env));
    process.set_cwd(cwd.into());
    process.set_user(user);
    process.set_capabilities(Some(default_capabilities(options.network)));
    // Like `docker run`: setuid programs (su, sudo) work unless asked otherwise.
    process.set_no_new_privileges(Some(options.security.no_new_privileges));
    // The host's limits, as the runtime has them: raising one past its hard
    // limit would fail.
    process.set_rlimits(None);
    spec.set_process(Some(process));

    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(rootfs.to_owned());
    root.set_readonly(Some(false));
    spec.set_root(Some(root));
    spec.set_hostname(Some(options.hostname.clone()));

    let mut linux = spec.linux().clone().unwrap_or_default();
    // The host's network, as `docker run --network host`: a server in the
    // container is reachable at 127.0.0.1, and name resolution is the host's.
    // Otherwise the default spec's network namespace stays: loopback only.
    if options.network == Network::Host {
        if let Some(namespaces) = linux.namespaces_mut() {
            namespaces.retain(|ns| ns.typ() != LinuxNamespaceType::Network);
        }
    }
    let strings = |paths: &[&str]| paths.iter().map(|p| (*p).to_owned()).collect();
    linux.set_masked_paths(Some(strings(MASKED_PATHS)));
    linux.set_readonly_paths(Some(strings(READONLY_PATHS)));
    let mut resources = linux.resources().clone().unwrap_or_default();
    resources.set_devices(Some(device_rules()));
    linux.set_resources(Some(resources));
    linux.set_seccomp(options.security.seccomp.then(seccomp_profile));
    spec.set_linux(Some(linux));
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for file in ["/etc/resolv.conf", "/etc/hosts"] {
        if Path::new(file).is_file() {
            let mut bind = Mount::default();
            bind.set_destination(file.into())
                .set_typ(Some("bind".to_owned()))
                .set_source(Some(file.into()))
                .set_options(Some(vec![
                    "rbind".into(),
                    "ro".into(),
                    "nosuid".into(),
                    "nodev".into(),
                ]));
            mounts.push(bind);
        }
    }
    spec.set_mounts(Some(mounts));

    std::fs::create_dir_all(bundle)
        .map_err(RuntimeError::io(format!("creating {}", bundle.display())))?;
    spec.save(bundle.join("config.json"))?;
    Ok(args)
}

/// Entrypoint plus Cmd, with the user's overrides.
fn command_line(image: &ExecConfig, options: &RunOptions) -> Result<Vec<String>, RuntimeError> {
    let entrypoint: Vec<String> = match &options.entrypoint {
        Some(e) if e.is_empty() => Vec::new(),
        Some(e) => vec![e.clone()],
        None => image.entrypoint.clone(),
    };
    // A new entrypoint drops the image's Cmd, as `docker run --entrypoint` does.
    let cmd = if !options.command.is_empty() {
        options.command.clone()
    } else if options.entrypoint.is_some() {
        Vec::new()
    } else {
        image.cmd.clone()
    };
    let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if args.is_empty() {
        return Err(RuntimeError::NoCommand);
    }
    Ok(args)
}

/// The image's environment with the user's entries set over it.
fn merge_env(image: &[String], user: &[String]) -> Vec<String> {
    let mut env = image.to_vec();
    for entry in user {
        if entry.contains('=') {
            set_env(&mut env, entry);
        } else if let Some(value) = std::env::var_os(entry) {
            set_env(&mut env, &format!("{entry}={}", value.to_string_lossy()));
        }
    }
    env
}

fn set_env(env: &mut Vec<String>, entry: &str) {
    let key = entry.split('=').next().unwrap_or(entry);
    let prefix = format!("{key}=");
    match env.iter_mut().find(|e| e.starts_with(&prefix)) {
        Some(existing) => *existing = entry.to_owned(),
        None => env.push(entry.to_owned()),
    }
}

/// The capabilities `docker run` grants by default, but CAP_NET_RAW on the
/// host's network: a raw socket there would read the host's loopback
/// traffic, bearer tokens included (docker's default network is a bridge of
/// the container's own).
fn default_capabilities(network: Network) -> LinuxCapabilities {
    let mut set: HashSet<Capability> = [
        Capability::Chown,
        Capability::DacOverride,
        Capability::Fsetid,
        Capability::Fowner,
        Capability::Mknod,
        Capability::NetRaw,
        Capability::Setgid,
        Capability::Setuid,
        Capability::Setfcap,
        Capability::Setpcap,
        Capability::NetBindService,
        Capability::SysChroot,
        Capability::Kill,
        Capability::AuditWrite,
    ]
    .into_iter()
    .collect();
    if network == Network::Host {
        set.remove(&Capability::NetRaw);
    }
    let mut caps = LinuxCapabilities::default();
    caps.set_bounding(Some(set.clone()))
        .set_effective(Some(set.clone()))
        .set_permitted(Some(set))
        .set_inheritable(None)
        .set_ambient(None);
    caps
}

/// `user[:group]` by name (looked up in the image's /etc/passwd and
/// /etc/group) or by number; a user without a group gets its passwd group.
fn resolve_user(rootfs: &Path, spec: &str) -> Result<User, RuntimeError> {
    let error = |reason: String| RuntimeError::User {
        user: spec.to_owned(),
        reason,
    };
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = image_file(rootfs, "etc/passwd");
    // name:password:uid:gid:…
    let entry = |name_or_uid: &str| {
        passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            let (name, uid, gid) = (fields.first()?, fields.get(2)?, fields.get(3)?);
            (*name == name_or_uid || *uid == name_or_uid)
                .then(|| Some((uid.parse::<u32>().ok()?, gid.parse::<u32>().ok()?)))
                .flatten()
        })
    };
    let (uid, passwd_gid) = match (user_part.parse::<u32>(), entry(user_part)) {
        (Ok(uid), found) => (uid, found.map_or(0, |(_, gid)| gid)),
        (Err(_), Some(found)) => found,
        (Err(_), None) => return Err(error("no such user in the image's /etc/passwd".into())),
    };
    let gid = match group_part {
        None => passwd_gid,
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => image_file(rootfs, "etc/group")
                .lines()
                .find_map(|line| {
                    let fields: Vec<&str> = line.split(':').collect();
                    (fields.first() == Some(&group))
                        .then(|| fields.get(2)?.parse::<u32>().ok())
                        .flatten()
                })
                .ok_or_else(|| error(format!("no group {group:?} in the image's /etc/group")))?,
        },
    };
    let mut user = User::default();
    user.set_uid(uid).set_gid(gid);
    Ok(user)
}

/// The most of /etc/passwd or /etc/group that is read.
const MAX_ACCOUNTS_FILE: u64 = 1 << 20;

/// A small text file of the image, or "" if it is absent, not a regular file
/// (a device or a pipe would hang or never end) or reached through a symlink
/// (which could point out of the image, onto the host).
fn image_file(rootfs: &Path, path: &str) -> String {
    use std::io::Read;
    let mut at = rootfs.to_owned();
    let parts: Vec<&str> = path.split('/').collect();
    for (n, part) in parts.iter().enumerate() {
        at.push(part);
        let Ok(meta) = std::fs::symlink_metadata(&at) else {
            return String::new();
        };
        let last = n + 1 == parts.len();
        if (last && !meta.is_file()) || (!last && !meta.is_dir()) {
            return String::new();
        }
    }
    let mut text = String::new();
    let _ =
        std::fs::File::open(at).and_then(|f| f.take(MAX_ACCOUNTS_FILE).read_to_string(&mut text));
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxDeviceType;

    fn image() -> ExecConfig {
        ExecConfig::from_image_config(
            r#"{"architecture":"amd64","config":{"Entrypoint":["/entry"],"Cmd":["serve","--port","80"],
            "Env":["PATH=/opt/bin:/bin","LANG=C.UTF-8"],"WorkingDir":"/srv","User":"app"}}"#,
        )
        .unwrap()
    }

    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/srv:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        dir
    }

    fn write(options: &RunOptions) -> Result<Spec, RuntimeError> {
        let root = rootfs();
        let bundle = root.path().join("bundle");
        write_bundle(&bundle, root.path(), &image(), options)?;
        Ok(Spec::load(bundle.join("config.json")).unwrap())
    }

    fn options() -> RunOptions {
        RunOptions {
            hostname: "box".into(),
            ..RunOptions::default()
        }
    }

    #[test]
    fn the_bundle_follows_the_image_config() {
        let spec = write(&options()).unwrap();
        let process = spec.process().as_ref().unwrap();
        assert_eq!(
            process.args().as_ref().unwrap(),
            &["/entry", "serve", "--port", "80"]
        );
        assert_eq!(process.cwd(), Path::new("/srv"));
        assert_eq!((process.user().uid(), process.user().gid()), (1000, 1001));
        let env = process.env().as_ref().unwrap();
        assert!(env.contains(&"PATH=/opt/bin:/bin".to_owned()));
        assert!(env.contains(&"LANG=C.UTF-8".to_owned()));
        assert!(env.contains(&"HOSTNAME=box".to_owned()));
        assert_eq!(spec.hostname().as_deref(), Some("box"));
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(false));
        let namespaces = spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap();
        assert!(namespaces
            .iter()
            .any(|n| n.typ() == LinuxNamespaceType::Pid));
        assert!(!namespaces
            .iter()
            .any(|n| n.typ() == LinuxNamespaceType::Network));
    }

    #[test]
    fn the_bundle_confines_as_docker_does_unless_told_otherwise() {
        let spec = write(&options()).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        assert!(linux.seccomp().is_some());
        let masked = linux.masked_paths().as_ref().unwrap();
        assert!(masked.contains(&"/proc/kcore".to_owned()));
        let devices = linux
            .resources()
            .as_ref()
            .unwrap()
            .devices()
            .as_ref()
            .unwrap();
        // Everything denied first, then the allow list.
        assert_eq!(devices[0].to_string(), "a *:* rwm");
        assert!(!devices[0].allow());
        assert!(devices
            .iter()
            .any(|d| d.allow() && d.to_string() == "c 1:3 rwm"));
        assert!(!devices.iter().any(|d| d.allow()
            && d.typ() == Some(LinuxDeviceType::B)
            && d.access().as_deref() != Some("m")));
        let process = spec.process().as_ref().unwrap();
        assert_eq!(process.no_new_privileges(), Some(false));
        let raw = |spec: &Spec| {
            let caps = spec
                .process()
                .as_ref()
                .unwrap()
                .capabilities()
                .as_ref()
                .unwrap();
            caps.bounding()
                .as_ref()
                .unwrap()
                .contains(&Capability::NetRaw)
        };
        assert!(!raw(&spec), "a raw socket on the host's network");

        let mut security = SecurityOptions::default();
        security.apply("no-new-privileges").unwrap();
        security.apply("seccomp=unconfined").unwrap();
        let spec = write(&RunOptions {
            network: Network::None,
            security,
            ..options()
        })
        .unwrap();
        let linux = spec.linux().as_ref().unwrap();
        assert!(linux.seccomp().is_none());
        assert!(linux
            .namespaces()
            .iter()
            .flatten()
            .any(|n| n.typ() == LinuxNamespaceType::Network));
        assert_eq!(
            spec.process().as_ref().unwrap().no_new_privileges(),
            Some(true)
        );
        assert!(raw(&spec), "its own network: docker's default set");
    }

    #[test]
    fn overrides_replace_what_the_image_says() {
        let spec = write(&RunOptions {
            command: vec!["sh".into(), "-c".into(), "id".into()],
            entrypoint: Some(String::new()),
            env: vec!["LANG=fr_FR".into(), "EXTRA=1".into()],
            workdir: Some("/tmp".into()),
            user: Some("0:staff".into()),
            tty: true,
            ..options()
        })
        .unwrap();
        let process = spec.process().as_ref().unwrap();
        assert_eq!(process.args().as_ref().unwrap(), &["sh", "-c", "id"]);
        assert_eq!(process.cwd(), Path::new("/tmp"));
        assert_eq!((process.user().uid(), process.user().gid()), (0, 50));
        assert_eq!(process.terminal(), Some(true));
        let env = process.env().as_ref().unwrap();
        assert!(
            env.contains(&"LANG=fr_FR".to_owned()) && !env.contains(&"LANG=C.UTF-8".to_owned())
        );
        assert!(env.contains(&"EXTRA=1".to_owned()) && env.contains(&"TERM=xterm".to_owned()));

        // A new entrypoint drops the image's Cmd.
        let spec = write(&RunOptions {
            entrypoint: Some("/bin/true".into()),
            ..options()
        })
        .unwrap();
        assert_eq!(
            spec.process().as_ref().unwrap().args().as_ref().unwrap(),
            &["/bin/true"]
        );
    }

    #[test]
    fn bad_requests_are_refused() {
        let unknown_user = write(&RunOptions {
            user: Some("nobody-here".into()),
            ..options()
        });
        assert!(
            matches!(unknown_user, Err(RuntimeError::User { .. })),
            "{unknown_user:?}"
        );
        let unknown_group = write(&RunOptions {
            user: Some("app:wheel".into()),
            ..options()
        });
        assert!(matches!(unknown_group, Err(RuntimeError::User { .. })));
        let relative = write(&RunOptions {
            workdir: Some("srv".into()),
            ..options()
        });
        assert!(matches!(relative, Err(RuntimeError::InvalidOption(_))));
        let root = rootfs();
        let empty = ExecConfig::from_image_config(r#"{"config":{}}"#).unwrap();
        assert!(matches!(
            write_bundle(&root.path().join("b"), root.path(), &empty, &options()),
            Err(RuntimeError::NoCommand)
        ));
        assert!(ExecConfig::from_image_config("{not json").is_err());
    }

    #[test]
    fn a_passwd_that_is_not_a_regular_file_is_not_read() {
        let root = rootfs();
        let passwd = root.path().join("etc/passwd");
        std::fs::remove_file(&passwd).unwrap();
        // A fifo would block the read forever (a device could never end).
        let made = std::process::Command::new("mkfifo")
            .arg(&passwd)
            .status()
            .unwrap();
        assert!(made.success());
        assert!(resolve_user(root.path(), "app").is_err());
        assert_eq!(resolve_user(root.path(), "1000").unwrap().uid(), 1000);
    }

    #[test]
    fn a_passwd_reached_through_a_symlink_is_not_read() {
        let root = rootfs();
        std::fs::remove_file(root.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.path().join("etc/passwd")).unwrap();
        // The host's passwd has root; the image's is out of reach, so "root" is unknown.
        assert!(resolve_user(root.path(), "root").is_err());
        assert_eq!(resolve_user(root.path(), "0").unwrap().uid(), 0);
    }
}
