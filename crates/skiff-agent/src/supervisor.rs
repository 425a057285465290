//! Mounts that outlive their daemon.
//!
//! A mount's supervisor is a small process that starts the mount daemon and
//! keeps a descriptor of its FUSE connection. The kernel keeps a connection
//! while any descriptor of it is open, so when the daemon dies (a crash,
//! kill -9) the mount stays, and the requests the daemon had read and not
//! answered stay queued on that descriptor. The supervisor starts a new
//! daemon and hands it the descriptor over a unix socket (SCM_RIGHTS) with
//! what it needs to serve the same image the same way ([`Handover`]); the
//! new daemon asks the kernel to send the pending requests again. A reader
//! sees a pause, never an error.
//!
//! ```text
//! RUN_DIR/mounts/KEY.supervisor.sock   where the supervisor's daemons find it
//! RUN_DIR/mounts/KEY.opens             the daemon's open-file journal (skiff-fuse)
//! RUN_DIR/mounts/KEY.image/            the image's metadata, so a new daemon needs no network
//! ```

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rustix::event::{poll, PollFd, PollFlags};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use skiff_fuse::{Connection, SessionState};

use crate::daemon::{MountSpec, RunDir};
use crate::error::{AgentError, IoContext, Result};
use crate::origin::PinnedImage;

/// Daemons in a row that die before they are ready, after which the
/// supervisor gives the mount up: one that cannot start would never start.
/// (A daemon killed after it served is replaced however often it happens.)
const MAX_FAILED_STARTS: u32 = 5;
/// The handover message is small; anything longer is not one.
const MAX_HANDOVER: usize = 1 << 20;

/// What a mount's next daemon needs besides the connection.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Handover {
    pub session: SessionState,
    pub image: PinnedImage,
    /// When the first daemon mounted it, so that uptime counts from there.
    pub started_unix: u64,
    /// Daemons that took the mount over so far.
    #[serde(default)]
    pub takeovers: u32,
}

/// How a mount daemon deals with its supervisor.
#[derive(Clone, Debug)]
pub enum Supervision {
    /// No supervisor: the mount dies with its daemon (`skiff mount --foreground`).
    None,
    /// Mount, then give the supervisor the connection.
    First { socket: PathBuf },
    /// Take over the connection the supervisor holds.
    Takeover { socket: PathBuf },
}

/// Serves the mount `spec` describes through daemons (this binary's hidden
/// `mount-daemon`), starting a new one on the same connection whenever one
/// dies while the file system is still mounted. Returns when a daemon exits
/// cleanly (unmounted), or when the mount is given up. `ready` is called
/// once the first daemon reports the mount ready.
pub fn supervise(
    run_dir: &RunDir,
    spec: &MountSpec,
    stop: mpsc::Receiver<()>,
    ready: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let socket_path = run_dir.supervisor_socket_path(&spec.mountpoint);
    let _ = std::fs::remove_file(&socket_path);
    let listener = UnixListener::bind(&socket_path)
        .io_context(|| format!("listening on {}", socket_path.display()))?;
    let _files = SupervisorFiles(run_dir, &spec.mountpoint);
    listener
        .set_nonblocking(true)
        .io_context(|| "setting the supervisor socket non-blocking".into())?;

    let (mut daemon, mut stdout) = spawn_daemon(run_dir, spec, &socket_path, false)?;
    let (connection, mut handover) = match accept(&listener, &mut daemon)? {
        Some(mut link) => {
            let (handover, fd) = receive_handover(&mut link)?;
            (fd, handover)
        }
        None => return Err(exited_early(&mut daemon, run_dir, spec)),
    };
    if !read_ready(&mut stdout) {
        return Err(exited_early(&mut daemon, run_dir, spec));
    }
    ready()?;

    let mut failed_starts = 0;
    let mut stopping = false;
    loop {
        if !stopping && stop.recv_timeout(Duration::from_millis(20)).is_ok() {
            stopping = true;
            signal(&daemon, Signal::SIGTERM);
        }
        let Some(status) = daemon
            .try_wait()
            .io_context(|| "waiting for the mount daemon".into())?
        else {
            if stopping {
                std::thread::sleep(Duration::from_millis(20));
            }
            continue;
        };
        if status.success() {
            return Ok(());
        }
        if !is_connected(&connection) {
            tracing::info!("the mount daemon exited ({status}) and the mount is gone");
            return Ok(());
        }
        if failed_starts >= MAX_FAILED_STARTS {
            give_up(spec, &status);
            return Err(AgentError::Settings(format!(
                "{MAX_FAILED_STARTS} mount daemons in a row died before they could take {} over; the mount is given up",
                spec.mountpoint.display(),
            )));
        }
        tracing::warn!(
            "the mount daemon (pid {}) died ({status}); a new one takes the mount over",
            daemon.id()
        );
        // Counted as failed until it says it is ready; the next waits longer.
        std::thread::sleep(Duration::from_millis(100) * failed_starts);
        failed_starts += 1;
        let started = Instant::now();
        handover.takeovers += 1;
        match spawn_daemon(run_dir, spec, &socket_path, true) {
            Ok(spawned) => (daemon, stdout) = spawned,
            // The loop finds the old one exited again, and tries again.
            Err(e) => {
                tracing::error!("{e}");
                continue;
            }
        }
        let handed = accept(&listener, &mut daemon).and_then(|link| match link {
            Some(mut link) => send_handover(&mut link, &handover, &connection).map(|()| true),
            None => Ok(false),
        });
        match handed {
            Ok(true) => {}
            // It exited: the loop sees it.
            Ok(false) => continue,
            Err(e) => {
                tracing::error!("handing the mount over: {e}");
                signal(&daemon, Signal::SIGKILL);
                continue;
            }
        }
        if read_ready(&mut stdout) {
            failed_starts = 0;
            tracing::info!(
                "the new mount daemon (pid {}) took over in {:.0} ms",
                daemon.id(),
                started.elapsed().as_secs_f64() * 1000.0
            );
        }
        if stopping {
            signal(&daemon, Signal::SIGTERM);
        }
    }
}

/// Removes the supervisor's files when it stops, however it stops.
struct SupervisorFiles<'a>(&'a RunDir, &'a Path);

impl Drop for SupervisorFiles<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0.supervisor_socket_path(self.1));
        let _ = std::fs::remove_file(self.0.journal_path(self.1));
        let _ = std::fs::remove_dir_all(self.0.kept_image_path(self.1));
    }
}

fn spawn_daemon(
    run_dir: &RunDir,
    spec: &MountSpec,
    socket: &Path,
    takeover: bool,
) -> Result<(Child, Option<ChildStdout>)> {
    let program = std::env::current_exe().io_context(|| "finding the skiff binary".into())?;
    let mut command = Command::new(program);
    command
        .arg("mount-daemon")
        .arg("--run-dir")
        .arg(run_dir.root())
        .arg("--supervisor")
        .arg(socket);
    if takeover {
        command.arg("--takeover");
    }
    // The daemon's log is the supervisor's (stderr).
    command.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = command
        .spawn()
        .io_context(|| "starting the mount daemon".into())?;
    let spec_json = serde_json::to_vec(spec).map_err(|source| AgentError::Json {
        context: "writing the mount spec".into(),
        source,
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A daemon that died at once shows in the log.
        let _ = stdin.write_all(&spec_json);
    }
    let stdout = child.stdout.take();
    Ok((child, stdout))
}

/// The daemon's link once it connects, or `None` if it exits first.
fn accept(listener: &UnixListener, daemon: &mut Child) -> Result<Option<UnixStream>> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .io_context(|| "setting the daemon's link blocking".into())?;
                return Ok(Some(stream));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).io_context(|| "accepting the mount daemon".into()),
        }
        if daemon
            .try_wait()
            .io_context(|| "waiting for the mount daemon".into())?
            .is_some()
        {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read_ready(stdout: &mut Option<ChildStdout>) -> bool {
    let mut line = String::new();
    if let Some(stdout) = stdout.take() {
        let _ = BufReader::new(stdout).read_line(&mut line);
    }
    line.trim() == "ready"
}

fn exited_early(daemon: &mut Child, run_dir: &RunDir, spec: &MountSpec) -> AgentError {
    let status = daemon
        .wait()
        .map(|s| s.to_string())
        .unwrap_or_else(|e| e.to_string());
    AgentError::DaemonFailed {
        status,
        reason: "its error is above".into(),
        log: run_dir.log_path(&spec.mountpoint),
    }
}

fn signal(daemon: &Child, signal: Signal) {
    let _ = kill(Pid::from_raw(daemon.id() as i32), signal);
}

/// Whether the kernel still has the connection (not unmounted, not aborted):
/// a `/dev/fuse` descriptor of a dead connection polls as an error.
fn is_connected(connection: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(connection, PollFlags::empty())];
    let now = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&now)) {
        Ok(_) => !fds[0]
            .revents()
            .intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL),
        Err(_) => false,
    }
}

/// Lets the mount go: detached, so that whatever is still open on it sees
/// the connection end instead of waiting.
fn give_up(spec: &MountSpec, status: &ExitStatus) {
    tracing::error!(
        "giving up the mount at {}: its daemons keep dying (last: {status})",
        spec.mountpoint.display()
    );
    if let Err(e) = nix::mount::umount2(&spec.mountpoint, nix::mount::MntFlags::MNT_DETACH) {
        tracing::warn!("detaching {}: {e}", spec.mountpoint.display());
    }
}

/// Sends `handover` and the connection's descriptor down `link`.
pub(crate) fn send_handover(
    link: &mut UnixStream,
    handover: &Handover,
    connection: &OwnedFd,
) -> Result<()> {
    let mut message = serde_json::to_vec(handover).map_err(|source| AgentError::Json {
        context: "writing the handover".into(),
        source,
    })?;
    message.push(b'\n');
    let fds = [connection.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    // The descriptor rides on the first bytes; the rest follows as a stream.
    let sent = sendmsg(
        link.as_fd(),
        &[IoSlice::new(&message)],
        &mut control,
        SendFlags::empty(),
    )
    .map_err(std::io::Error::from)
    .io_context(|| "sending the FUSE connection".into())?;
    link.write_all(&message[sent..])
        .io_context(|| "sending the handover".into())
}

/// Reads what [`send_handover`] sent.
pub(crate) fn receive_handover(link: &mut UnixStream) -> Result<(Handover, OwnedFd)> {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = recvmsg(
        link.as_fd(),
        &mut [IoSliceMut::new(&mut buffer)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)
    .io_context(|| "receiving the FUSE connection".into())?;
    let mut fd = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            for received_fd in fds {
                fd.get_or_insert(received_fd);
            }
        }
    }
    let fd = fd.ok_or_else(|| {
        AgentError::Settings("the handover came without a FUSE connection".into())
    })?;
    let mut message = buffer[..received.bytes].to_vec();
    if !message.contains(&b'\n') {
        let mut rest = BufReader::new(link.take(MAX_HANDOVER as u64));
        rest.read_until(b'\n', &mut message)
            .io_context(|| "receiving the handover".into())?;
    }
    let line = message.split(|&b| b == b'\n').next().unwrap_or_default();
    let handover = serde_json::from_slice(line).map_err(|source| AgentError::Json {
        context: "reading the handover".into(),
        source,
    })?;
    Ok((handover, fd))
}

/// The daemon's side of the link: connects to the supervisor and either
/// gives it the connection of a fresh mount or takes the one it holds.
pub(crate) fn connect(socket: &Path) -> Result<UnixStream> {
    UnixStream::connect(socket).io_context(|| {
        format!(
            "connecting to the mount's supervisor at {}",
            socket.display()
        )
    })
}

/// For the daemon: its connection as a [`Connection`] for [`skiff_fuse::Mount::take_over`].
pub(crate) fn into_connection(handover: &Handover, fd: OwnedFd) -> Connection {
    Connection {
        fd,
        state: handover.session,
    }
}
