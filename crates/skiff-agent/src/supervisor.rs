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
//! The files it and its daemons keep are [`ConnectionFiles`].

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rustix::event::{poll, PollFd, PollFlags};
use rustix::net::sockopt::socket_peercred;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use skiff_fuse::{Connection, SessionState};

use crate::daemon::{ConnectionFiles, MountSpec, RunDir};
use crate::error::{AgentError, IoContext, Result};
use crate::host::ProcessId;
use crate::origin::PinnedImage;

/// Daemons in a row that die before they are ready, after which the
/// supervisor gives the mount up: one that cannot start would never start.
/// (A daemon killed after it served is replaced however often it happens.)
const MAX_FAILED_STARTS: u32 = 5;
/// The handover message is small; anything longer is not one.
const MAX_HANDOVER: usize = 1 << 20;
/// How long a daemon may take to be ready: opening the image (from the
/// network, for a first mount) and mounting it.
const READY_WAIT: Duration = Duration::from_secs(120);
/// How long one side of a hand-over waits for the other.
const LINK_WAIT: Duration = Duration::from_secs(10);

/// What a mount's next daemon needs besides the connection.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Handover {
    pub session: SessionState,
    pub image: PinnedImage,
    /// When the first daemon mounted it, so that uptime counts from there.
    pub started_unix: u64,
    /// Daemons that took the mount over so far.
    pub takeovers: u32,
    /// Daemons started on the connection before this one, served or not:
    /// a daemon's file handles start above every earlier one's.
    pub generation: u32,
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

/// What an upgrade asks of a running supervisor, and what it answers:
/// everything its daemons are told, and the connection (beside it).
#[derive(Serialize, Deserialize)]
struct Upgrade {
    spec: MountSpec,
    handover: Handover,
}

/// A line a client (not a daemon) sends on the supervisor's socket.
#[derive(Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "lowercase")]
enum SupervisorRequest {
    /// Hand the mount to the asking supervisor: a new binary's (`skiff upgrade`).
    Upgrade,
}

/// The asker's line once it holds the connection: the old daemon may go.
const TAKEN: &str = "taken";
/// The old supervisor's answer once its daemon is dead.
const RELEASED: &str = "released";
/// The old supervisor's answer when it is being stopped: no upgrade.
const REFUSED: &str = "refused";
/// The asker's last line, once its daemon serves: only then does the old
/// supervisor let go of its descriptor. Without it (the asker failed or
/// died), the old supervisor starts a daemon of its own on the connection.
const SERVING: &str = "serving";

/// Serves the mount `spec` describes through daemons (this binary's hidden
/// `mount-daemon`), starting a new one on the same connection whenever one
/// dies while the file system is still mounted. Returns when a daemon exits
/// cleanly (unmounted), when the mount is given up, or when it is handed to
/// a new supervisor (an upgrade). `ready` is called once the first daemon
/// reports the mount ready.
pub fn supervise(
    run_dir: &RunDir,
    spec: MountSpec,
    stop: mpsc::Receiver<()>,
    ready: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let connection_files = run_dir.connection_files(&spec.mountpoint, ProcessId::current());
    let (socket_path, listener) = listen(&connection_files)?;
    let mut files = SupervisorFiles::new(connection_files);
    let (mut daemon, stdout) = spawn_daemon(run_dir, &spec, &socket_path, false)?;
    let (connection, handover) = match accept_daemon(&listener, &mut daemon)? {
        Some(mut link) => {
            let (handover, fd) = receive_with_fd(&mut link, "the handover")?;
            (fd, handover)
        }
        None => return Err(exited_early(&mut daemon, run_dir, &spec)),
    };
    let supervisor = Supervisor {
        run_dir,
        spec,
        socket_path,
        listener,
        connection,
        handover,
        daemon,
    };
    supervisor.serve_once_ready(stdout, ready, stop, &mut files)
}

/// Takes the mount at `mountpoint` (canonical) over from the supervisor
/// that serves it, with this binary: that supervisor's daemon is killed and
/// a new one, started from this binary, serves the same connection; open
/// files and running containers go on. `ready` is called once it serves.
pub fn supervise_upgrade(
    run_dir: &RunDir,
    mountpoint: &Path,
    stop: mpsc::Receiver<()>,
    ready: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let connection_files = run_dir
        .record(mountpoint)
        .and_then(|record| record.supervisor_socket)
        .as_deref()
        .and_then(ConnectionFiles::of_socket)
        .ok_or_else(|| {
            AgentError::Supervisor(format!(
                "{} has no supervisor (mounted by an older skiff, or with --foreground): \
                 unmount it and mount it again",
                mountpoint.display()
            ))
        })?;
    let old_socket = connection_files.socket();
    let mut link = UnixStream::connect(&old_socket).io_context(|| {
        format!(
            "connecting to the supervisor of {} at {} (a mount from an older skiff, or \
             `skiff mount --foreground`, cannot be upgraded: unmount and mount it again)",
            mountpoint.display(),
            old_socket.display()
        )
    })?;
    write_line(&mut link, &SupervisorRequest::Upgrade)?;
    let (Upgrade { spec, mut handover }, connection) =
        receive_with_fd(&mut link, "the mount to upgrade")?;
    // Until the old supervisor says its daemon is dead, nothing is ours.
    say(&link, TAKEN).io_context(|| "answering the old supervisor".into())?;
    let released =
        hear(&link, LINK_WAIT).io_context(|| "waiting for the old supervisor to let go".into())?;
    if released != RELEASED {
        return Err(AgentError::Supervisor(format!(
            "the supervisor of {} did not let the mount go ({}): it is being stopped, or failed",
            mountpoint.display(),
            released
        )));
    }
    let (socket_path, listener) = listen(&connection_files)?;
    // The connection's files are not this one's to remove until its daemon
    // serves: if this fails, the old supervisor goes on with them.
    if let Some(mut record) = run_dir.record(&spec.mountpoint) {
        // The new daemon publishes the mount only if its record names its supervisor.
        record.supervisor = Some(ProcessId::current());
        run_dir.write_record(&record)?;
    }
    // The old supervisor reserved this daemon's generation when it sent the handover.
    handover.takeovers += 1;
    let (mut daemon, mut stdout) = spawn_daemon(run_dir, &spec, &socket_path, true)?;
    match accept_daemon(&listener, &mut daemon)? {
        Some(mut daemon_link) => send_with_fd(&mut daemon_link, &handover, &connection)?,
        None => return Err(exited_early(&mut daemon, run_dir, &spec)),
    }
    if !read_ready(&mut stdout, &daemon) {
        return Err(exited_early(&mut daemon, run_dir, &spec));
    }
    let _ = say(&link, SERVING);
    let mut files = SupervisorFiles::new(connection_files);
    ready()?;
    let supervisor = Supervisor {
        run_dir,
        spec,
        socket_path,
        listener,
        connection,
        handover,
        daemon,
    };
    supervisor.run(stop, &mut files)
}

struct Supervisor<'a> {
    run_dir: &'a RunDir,
    spec: MountSpec,
    socket_path: PathBuf,
    listener: UnixListener,
    /// The supervisor's descriptor of the mount's FUSE connection.
    connection: OwnedFd,
    handover: Handover,
    daemon: Child,
}

impl Supervisor<'_> {
    /// Tells the caller once the daemon just started is ready, then supervises.
    fn serve_once_ready(
        mut self,
        mut stdout: Option<ChildStdout>,
        ready: impl FnOnce() -> Result<()>,
        stop: mpsc::Receiver<()>,
        files: &mut SupervisorFiles,
    ) -> Result<()> {
        if !read_ready(&mut stdout, &self.daemon) {
            return Err(exited_early(&mut self.daemon, self.run_dir, &self.spec));
        }
        ready()?;
        self.run(stop, files)
    }

    fn run(mut self, stop: mpsc::Receiver<()>, files: &mut SupervisorFiles) -> Result<()> {
        let mut failed_starts = 0;
        let mut stopping = false;
        let mut daemon_exit = exit_of(&self.daemon);
        loop {
            // Woken at once by the daemon's exit or a request; a signal is
            // seen within the timeout.
            wait_for_news(daemon_exit.as_ref(), (!stopping).then_some(&self.listener));
            if !stopping && stop.try_recv().is_ok() {
                stopping = true;
                signal(&self.daemon, Signal::SIGTERM);
            }
            if !stopping {
                if let Some(link) = self.request() {
                    match self.hand_to_new_supervisor(link, &stop)? {
                        Handed::Yes => {
                            // The mount, its journal and its metadata are the new supervisor's.
                            files.disarm();
                            return Ok(());
                        }
                        Handed::Stopping => {
                            stopping = true;
                            signal(&self.daemon, Signal::SIGTERM);
                        }
                        Handed::No => {}
                    }
                }
            }
            let Some(status) = self
                .daemon
                .try_wait()
                .io_context(|| "waiting for the mount daemon".into())?
            else {
                continue;
            };
            if status.success() {
                return Ok(());
            }
            if !is_connected(&self.connection) {
                tracing::info!("the mount daemon exited ({status}) and the mount is gone");
                return Ok(());
            }
            if !self.handover.session.resend {
                give_up(&self.spec, &status);
                return Err(AgentError::Supervisor(format!(
                    "the mount daemon of {} died ({status}), and this kernel cannot send a new \
                     one the requests it had read (FUSE_NOTIFY_RESEND needs Linux 6.9)",
                    self.spec.mountpoint.display()
                )));
            }
            if failed_starts >= MAX_FAILED_STARTS {
                give_up(&self.spec, &status);
                return Err(AgentError::Supervisor(format!(
                    "{MAX_FAILED_STARTS} mount daemons in a row died before they could take {} over; the mount is given up",
                    self.spec.mountpoint.display(),
                )));
            }
            tracing::warn!(
                "the mount daemon (pid {}) died ({status}); a new one takes the mount over",
                self.daemon.id()
            );
            // Counted as failed until it says it is ready; the next waits longer.
            std::thread::sleep(Duration::from_millis(100) * failed_starts);
            failed_starts += 1;
            if self.take_over() {
                failed_starts = 0;
            }
            daemon_exit = exit_of(&self.daemon);
            if stopping {
                signal(&self.daemon, Signal::SIGTERM);
            }
        }
    }

    /// Starts a daemon that takes the connection over; whether it is ready.
    /// One that could not start leaves the old, exited one in its place,
    /// which the loop finds exited again.
    fn take_over(&mut self) -> bool {
        let started = Instant::now();
        // As the new daemon will count it; taken back if it does not start.
        self.handover.takeovers += 1;
        self.handover.generation += 1;
        let ready = self.start_successor(started);
        if !ready {
            self.handover.takeovers -= 1;
        }
        ready
    }

    fn start_successor(&mut self, started: Instant) -> bool {
        let mut stdout = match spawn_daemon(self.run_dir, &self.spec, &self.socket_path, true) {
            Ok((daemon, stdout)) => {
                self.daemon = daemon;
                stdout
            }
            Err(e) => {
                tracing::error!("{e}");
                return false;
            }
        };
        let handed = accept_daemon(&self.listener, &mut self.daemon).and_then(|link| match link {
            Some(mut link) => {
                send_with_fd(&mut link, &self.handover, &self.connection).map(|()| true)
            }
            None => Ok(false),
        });
        match handed {
            Ok(true) => {}
            // It exited: the loop sees it.
            Ok(false) => return false,
            Err(e) => {
                tracing::error!("handing the mount over: {e}");
                signal(&self.daemon, Signal::SIGKILL);
                return false;
            }
        }
        let ready = read_ready(&mut stdout, &self.daemon);
        if ready {
            tracing::info!(
                "the new mount daemon (pid {}) took over in {:.0} ms",
                self.daemon.id(),
                started.elapsed().as_secs_f64() * 1000.0
            );
        }
        ready
    }

    /// A client waiting on the socket, if one is and it may ask (root, or
    /// this supervisor's user).
    fn request(&self) -> Option<UnixStream> {
        let (stream, _) = self.listener.accept().ok()?;
        let peer = socket_peercred(&stream).ok()?;
        if peer.uid.as_raw() != 0 && peer.uid != rustix::process::getuid() {
            tracing::warn!("refusing a request from uid {}", peer.uid.as_raw());
            return None;
        }
        stream.set_nonblocking(false).ok()?;
        Some(stream)
    }

    /// Answers an upgrade: hands the connection and the spec to the asking
    /// supervisor, kills this daemon (which must not unmount) and reaps it,
    /// and says so. Whether the mount was handed over.
    fn hand_to_new_supervisor(
        &mut self,
        mut link: UnixStream,
        stop: &mpsc::Receiver<()>,
    ) -> Result<Handed> {
        let _ = link.set_read_timeout(Some(Duration::from_secs(5)));
        let mut line = String::new();
        let _ = BufReader::new((&link).take(4096)).read_line(&mut line);
        match serde_json::from_str::<SupervisorRequest>(line.trim()) {
            Ok(SupervisorRequest::Upgrade) => {}
            Err(e) => {
                tracing::warn!("a request that is not one on the supervisor's socket: {e}");
                return Ok(Handed::No);
            }
        }
        // The asker's daemon's generation, never this one's next daemon's.
        self.handover.generation += 1;
        let upgrade = Upgrade {
            spec: self.spec.clone(),
            handover: self.handover.clone(),
        };
        let taken = send_with_fd(&mut link, &upgrade, &self.connection).and_then(|()| {
            hear(&link, LINK_WAIT).io_context(|| "waiting for the new supervisor".into())
        });
        let taken = match taken {
            Ok(line) => line,
            Err(e) => {
                tracing::warn!("an upgrade went away before it took the mount: {e}");
                return Ok(Handed::No);
            }
        };
        if taken != TAKEN {
            tracing::warn!("an upgrade did not take the mount");
            return Ok(Handed::No);
        }
        // `skiff umount` came first: it signalled this process, not the asker.
        if stop.try_recv().is_ok() {
            let _ = say(&link, REFUSED);
            return Ok(Handed::Stopping);
        }
        tracing::info!("handing the mount to a new supervisor (an upgrade)");
        signal(&self.daemon, Signal::SIGKILL);
        self.daemon
            .wait()
            .io_context(|| "waiting for the mount daemon".into())?;
        let _ = say(&link, RELEASED);
        // Until the new one serves, this descriptor and the daemon it can start
        // are the mount's only hope.
        if hear(&link, READY_WAIT + LINK_WAIT).is_ok_and(|line| line == SERVING) {
            return Ok(Handed::Yes);
        }
        tracing::error!("the upgrade failed after this daemon was stopped; starting another");
        // The asker took the socket's path; have it back for the next daemon.
        let files = ConnectionFiles::of_socket(&self.socket_path).ok_or_else(|| {
            AgentError::Supervisor(format!(
                "{} is not a supervisor's socket",
                self.socket_path.display()
            ))
        })?;
        (_, self.listener) = listen(&files)?;
        Ok(Handed::No)
    }
}

/// A descriptor that polls readable when `daemon` exits (a pidfd).
fn exit_of(daemon: &Child) -> Option<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(daemon.id()).ok()?)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
}

/// Waits up to 20 ms for the daemon to exit or a client to connect.
fn wait_for_news(daemon_exit: Option<&OwnedFd>, listener: Option<&UnixListener>) {
    let mut fds: Vec<PollFd<'_>> = daemon_exit
        .map(|fd| PollFd::new(fd, PollFlags::IN))
        .into_iter()
        .chain(listener.map(|l| PollFd::new(l, PollFlags::IN)))
        .collect();
    let timeout = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 20_000_000,
    };
    let _ = poll(&mut fds, Some(&timeout));
}

/// What came of an upgrade request.
enum Handed {
    /// The new supervisor serves the mount.
    Yes,
    /// This one goes on (a daemon of its own, if its own was stopped).
    No,
    /// This one is being stopped, and refused.
    Stopping,
}

fn listen(files: &ConnectionFiles) -> Result<(PathBuf, UnixListener)> {
    let socket_path = files.socket();
    let _ = std::fs::remove_file(&socket_path);
    let listener = UnixListener::bind(&socket_path)
        .io_context(|| format!("listening on {}", socket_path.display()))?;
    listener
        .set_nonblocking(true)
        .io_context(|| "setting the supervisor socket non-blocking".into())?;
    Ok((socket_path, listener))
}

/// Removes the supervisor's files when it stops, however it stops, unless
/// the mount went to a new supervisor.
struct SupervisorFiles(Option<ConnectionFiles>);

impl SupervisorFiles {
    fn new(files: ConnectionFiles) -> SupervisorFiles {
        SupervisorFiles(Some(files))
    }

    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for SupervisorFiles {
    fn drop(&mut self) {
        if let Some(files) = &self.0 {
            files.remove();
        }
    }
}

fn spawn_daemon(
    run_dir: &RunDir,
    spec: &MountSpec,
    socket: &Path,
    takeover: bool,
) -> Result<(Child, Option<ChildStdout>)> {
    // This very binary, even once a new one is installed over it (until `skiff upgrade`).
    let mut command = Command::new("/proc/self/exe");
    if let Ok(path) = std::env::current_exe() {
        // What `ps` shows.
        command.arg0(path);
    }
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

/// The daemon's link once it connects, or `None` if it exits first. Only
/// the daemon just started may take or give the connection: a connection
/// from any other process is dropped.
fn accept_daemon(listener: &UnixListener, daemon: &mut Child) -> Result<Option<UnixStream>> {
    let deadline = Instant::now() + READY_WAIT;
    loop {
        if Instant::now() > deadline {
            tracing::error!(
                "the mount daemon (pid {}) did not come for the connection within {} s",
                daemon.id(),
                READY_WAIT.as_secs()
            );
            signal(daemon, Signal::SIGKILL);
            let _ = daemon.wait();
            return Ok(None);
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let peer = socket_peercred(&stream).map(|c| c.pid.as_raw_nonzero().get());
                if peer.ok() != Some(daemon.id() as i32) {
                    tracing::warn!("ignoring a connection from {peer:?} while a daemon starts");
                    continue;
                }
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

/// Whether the daemon says it is ready within [`READY_WAIT`]; one that
/// does not is killed (the loop then sees it exit).
fn read_ready(stdout: &mut Option<ChildStdout>, daemon: &Child) -> bool {
    let Some(stdout) = stdout.take() else {
        return false;
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(READY_WAIT) {
        Ok(line) => line.trim() == "ready",
        Err(_) => {
            tracing::error!(
                "the mount daemon (pid {}) was not ready within {} s",
                daemon.id(),
                READY_WAIT.as_secs()
            );
            signal(daemon, Signal::SIGKILL);
            false
        }
    }
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

/// One word of the upgrade protocol, as a line.
fn say(link: &UnixStream, word: &str) -> std::io::Result<()> {
    (&*link).write_all(format!("{word}\n").as_bytes())
}

/// The next short line from `link`, trimmed, waiting at most `wait`.
fn hear(link: &UnixStream, wait: Duration) -> std::io::Result<String> {
    link.set_read_timeout(Some(wait))?;
    let mut line = String::new();
    BufReader::new(link.take(64)).read_line(&mut line)?;
    Ok(line.trim().to_owned())
}

fn write_line(link: &mut UnixStream, message: &impl Serialize) -> Result<()> {
    let mut line = serde_json::to_vec(message).map_err(|source| AgentError::Json {
        context: "writing to the supervisor's socket".into(),
        source,
    })?;
    line.push(b'\n');
    link.write_all(&line)
        .io_context(|| "writing to the supervisor's socket".into())
}

/// Sends `message` (one JSON line) and the connection's descriptor down `link`.
pub(crate) fn send_with_fd(
    link: &mut UnixStream,
    message: &impl Serialize,
    connection: &OwnedFd,
) -> Result<()> {
    let mut line = serde_json::to_vec(message).map_err(|source| AgentError::Json {
        context: "writing the handover".into(),
        source,
    })?;
    line.push(b'\n');
    let fds = [connection.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    // The descriptor rides on the first bytes; the rest follows as a stream.
    let sent = sendmsg(
        link.as_fd(),
        &[IoSlice::new(&line)],
        &mut control,
        SendFlags::empty(),
    )
    .map_err(std::io::Error::from)
    .io_context(|| "sending the FUSE connection".into())?;
    link.write_all(&line[sent..])
        .io_context(|| "sending the handover".into())
}

/// Reads what [`send_with_fd`] sent: `what`, and the descriptor.
pub(crate) fn receive_with_fd<T: DeserializeOwned>(
    link: &mut UnixStream,
    what: &str,
) -> Result<(T, OwnedFd)> {
    link.set_read_timeout(Some(LINK_WAIT))
        .io_context(|| format!("receiving {what}"))?;
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
    .io_context(|| format!("receiving {what}"))?;
    let mut fd = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            for received_fd in fds {
                fd.get_or_insert(received_fd);
            }
        }
    }
    let fd =
        fd.ok_or_else(|| AgentError::Supervisor(format!("{what} came without a FUSE connection")))?;
    let mut message = buffer[..received.bytes].to_vec();
    if !message.contains(&b'\n') {
        let mut rest = BufReader::new(link.take(MAX_HANDOVER as u64));
        rest.read_until(b'\n', &mut message)
            .io_context(|| format!("receiving {what}"))?;
    }
    let line = message.split(|&b| b == b'\n').next().unwrap_or_default();
    let value = serde_json::from_slice(line).map_err(|source| AgentError::Json {
        context: format!("reading {what}"),
        source,
    })?;
    let _ = link.set_read_timeout(None);
    Ok((value, fd))
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
        generation: handover.generation,
    }
}
