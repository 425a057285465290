//! Hosts for tests that need several: network namespaces joined to one
//! "server" namespace by veth pairs, each with its own address, plus a
//! link from the test's own namespace to the server's (to read its
//! metrics). Only the network is separate: the hosts share the file system,
//! as hosts with shared storage do. Removed on drop.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static LABS: AtomicU32 = AtomicU32::new(0);

pub struct Hosts {
    /// Short and unique on this machine: names of namespaces and links.
    tag: String,
    /// The second octet of every address of this set of hosts.
    net: u32,
    pub count: usize,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().unwrap();
    assert!(status.success(), "ip {}", args.join(" "));
}

impl Hosts {
    /// `count` hosts and a server namespace, all up.
    pub fn new(count: usize) -> Hosts {
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let hosts = Hosts {
            tag: format!("{}{n}", std::process::id() % 10_000),
            net: 100 + (std::process::id() * 8 + n) % 100,
            count,
        };
        ip(&["netns", "add", &hosts.ns_name(0)]);
        // Link 0 joins the test's own namespace; links 1.. the hosts.
        for k in 0..=count {
            let (near, far) = (
                format!("sk{}a{k}", hosts.tag),
                format!("sk{}b{k}", hosts.tag),
            );
            ip(&["link", "add", &near, "type", "veth", "peer", "name", &far]);
            ip(&["link", "set", &far, "netns", &hosts.ns_name(0)]);
            if k > 0 {
                ip(&["netns", "add", &hosts.ns_name(k)]);
                ip(&["link", "set", &near, "netns", &hosts.ns_name(k)]);
            }
            let in_ns = |ns: &str, args: &[&str]| {
                let mut all = vec!["-n", ns];
                all.extend_from_slice(args);
                ip(&all);
            };
            let server_side = format!("{}/24", hosts.server_addr(k));
            let host_side = format!("10.{}.{k}.2/24", hosts.net);
            in_ns(
                &hosts.ns_name(0),
                &["addr", "add", &server_side, "dev", &far],
            );
            in_ns(&hosts.ns_name(0), &["link", "set", &far, "up"]);
            if k == 0 {
                ip(&["addr", "add", &host_side, "dev", &near]);
                ip(&["link", "set", &near, "up"]);
            } else {
                in_ns(
                    &hosts.ns_name(k),
                    &["addr", "add", &host_side, "dev", &near],
                );
                in_ns(&hosts.ns_name(k), &["link", "set", &near, "up"]);
                in_ns(&hosts.ns_name(k), &["link", "set", "lo", "up"]);
            }
        }
        hosts
    }

    /// Namespace 0 is the server's; 1.. the hosts'.
    fn ns_name(&self, k: usize) -> String {
        format!("skiff-{}-{k}", self.tag)
    }

    /// The server's address as host `k` reaches it (0: as the test does).
    pub fn server_addr(&self, k: usize) -> String {
        format!("10.{}.{k}.1", self.net)
    }

    /// `program` to run in the server's namespace.
    pub fn in_server(&self, program: &Path) -> Command {
        self.in_ns(0, program)
    }

    /// `program` to run on host `k` (1..=count): in its network namespace only.
    pub fn on_host(&self, k: usize, program: &Path) -> Command {
        assert!((1..=self.count).contains(&k));
        self.in_ns(k, program)
    }

    fn in_ns(&self, k: usize, program: &Path) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.ns_name(k)))
            .arg("--")
            .arg(program);
        command
    }

    /// Takes host `k` off the network: its connections hang, as a host's
    /// whose cable was pulled.
    pub fn unplug(&self, k: usize) {
        ip(&[
            "-n",
            &self.ns_name(k),
            "link",
            "set",
            &format!("sk{}a{k}", self.tag),
            "down",
        ]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Removing a namespace removes the veth ends in it, and their peers.
        for k in 0..=self.count {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns_name(k)])
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("sk{}a0", self.tag)])
            .stderr(Stdio::null())
            .status();
    }
}
