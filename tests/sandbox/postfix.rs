//! A real, private Postfix (Debian package `postfix`) behind the gatekeeper:
//! its own config, queue and data directories under a directory the caller
//! gives, SMTP AUTH through Cyrus SASL from its own sasldb (package
//! `sasl2-bin`), and every accepted message delivered by Postfix's own smtp
//! client to an `smtp-sink` the fixture starts. Nothing leaves loopback.
//!
//! Layout under `dir`:
//!
//! ```text
//! etc/main.cf, etc/master.cf   config_directory (`postfix -c DIR/etc`)
//! etc/sasl/smtpd.conf, sasldb2 Cyrus SASL (Debian's smtpd reads
//!                              $config_directory/sasl, whatever
//!                              cyrus_sasl_config_path says)
//! queue/                       queue_directory (root-owned, as Postfix wants)
//! data/                        data_directory (owned by `postfix`)
//! maillog                      every daemon's log, through postlogd
//! sink/                        one file per message smtp-sink received
//! ```
//!
//! The local domain is `example.org`; `mynetworks` is 203.0.113.0/24, so
//! loopback is not trusted, but loopback may send XCLIENT. Relaying to any
//! other domain needs SMTP AUTH (`554 Relay access denied` otherwise).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::netns::Netns;

/// The domain Postfix delivers locally (into the sink, like everything else)
/// and the default SASL realm.
pub const LOCAL_DOMAIN: &str = "example.org";
/// Postfix's `myhostname`: its greeting is `220 mx.example.org ESMTP Postfix`.
pub const HOSTNAME: &str = "mx.example.org";

/// What to start.
#[derive(Debug, Clone, Copy, Default)]
pub struct PostfixSpec<'a> {
    /// `IP:PORT` smtpd listens on, e.g. `127.0.0.1:10025`.
    pub listen: &'a str,
    /// `127.0.0.1:PORT` for the smtp-sink that receives every delivery.
    pub sink_listen: &'a str,
    /// SASL users as `(login, password)`. A login `user@realm` is stored in
    /// that realm; a bare `user` in `example.org`. Since the server's realm is
    /// `example.org`, `user` and `user@example.org` log in alike.
    pub users: &'a [(&'a str, &'a str)],
    /// Appended verbatim to main.cf (later settings win).
    pub main_cf_extra: &'a str,
}

/// A running Postfix master; stopped (killed if need be) when dropped.
/// Files stay in `dir` for the caller (usually a temp dir) to remove.
pub struct Postfix {
    // Field order: Postfix stops before the sink goes.
    master: Master,
    sink: Child,
    dir: PathBuf,
    listen: SocketAddr,
    netns: Option<String>,
}

struct Master {
    config_dir: PathBuf,
    pid: Option<i32>,
}

static INSTANCES: AtomicUsize = AtomicUsize::new(0);

impl Postfix {
    /// Starts Postfix and its sink inside `ns` (the master, and so every
    /// daemon, lives in that namespace); returns once smtpd greets on
    /// `spec.listen`.
    pub fn start(ns: &Netns, dir: &Path, spec: &PostfixSpec) -> Result<Postfix> {
        Postfix::start_in(Some(ns), dir, spec)
    }

    /// As `start`, on the host's own network stack (loopback).
    pub fn start_on_host(dir: &Path, spec: &PostfixSpec) -> Result<Postfix> {
        Postfix::start_in(None, dir, spec)
    }

    fn start_in(ns: Option<&Netns>, dir: &Path, spec: &PostfixSpec) -> Result<Postfix> {
        let listen: SocketAddr = spec
            .listen
            .parse()
            .with_context(|| format!("listen {:?}", spec.listen))?;
        let sink_addr: SocketAddr = spec
            .sink_listen
            .parse()
            .with_context(|| format!("sink_listen {:?}", spec.sink_listen))?;
        ensure!(
            listen.is_ipv4(),
            "the fixture runs Postfix with inet_protocols = ipv4"
        );
        let netns = ns.map(|ns| ns.path());

        let etc = dir.join("etc");
        let sasl = etc.join("sasl");
        let queue = dir.join("queue");
        let data = dir.join("data");
        let sink_dir = dir.join("sink");
        for d in [&sasl, &queue, &data, &sink_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        // Postfix's daemons run as `postfix`, smtp-sink as `nobody`: both must
        // walk down to `dir`.
        searchable_ancestors(dir)?;
        for d in [dir, &etc, &sasl, &queue] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        }
        std::fs::set_permissions(&sink_dir, std::fs::Permissions::from_mode(0o777))?;
        let (postfix_uid, postfix_gid) = postfix_ids()?;
        // queue_directory stays root's (post-install warns otherwise and
        // creates the postfix-owned subdirectories); data_directory is postfix's.
        std::os::unix::fs::chown(&data, Some(postfix_uid), Some(postfix_gid))
            .context("chown data_directory to postfix")?;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))?;

        let instance = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let syslog_name = format!("postfix-test-{}-{instance}", std::process::id());
        let sasldb = sasl.join("sasldb2");
        std::fs::write(
            etc.join("main.cf"),
            main_cf(dir, &syslog_name, listen, sink_addr, spec),
        )?;
        std::fs::write(etc.join("master.cf"), master_cf(listen))?;
        std::fs::write(
            sasl.join("smtpd.conf"),
            format!(
                "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\nsasldb_path: {}\n",
                sasldb.display()
            ),
        )?;
        for (login, password) in spec.users {
            add_sasl_user(&sasldb, login, password)?;
        }
        if sasldb.exists() {
            // smtpd reads it as `postfix`.
            std::os::unix::fs::chown(&sasldb, Some(0), Some(postfix_gid))?;
            std::fs::set_permissions(&sasldb, std::fs::Permissions::from_mode(0o640))?;
        }

        let sink = command(netns.as_deref(), "smtp-sink")
            .args(["-u", "nobody", "-h", "sink.test", "-d"])
            .arg(sink_dir.join("msg."))
            .arg(spec.sink_listen)
            .arg("256")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting smtp-sink (Debian package postfix)")?;
        let mut postfix = Postfix {
            master: Master {
                config_dir: etc.clone(),
                pid: None,
            },
            sink,
            dir: dir.to_owned(),
            listen,
            netns,
        };
        wait_banner(postfix.netns.as_deref(), sink_addr, Duration::from_secs(30))
            .context("smtp-sink did not come up")?;

        let out = command(postfix.netns.as_deref(), "postfix")
            .arg("-c")
            .arg(&etc)
            .arg("start")
            .stdin(Stdio::null())
            .output()
            .context("running `postfix start` (Debian package postfix)")?;
        if !out.status.success() {
            bail!(
                "postfix -c {} start failed ({}): {}{}\n{}",
                etc.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                postfix.diagnose()
            );
        }
        postfix.master.pid = std::fs::read_to_string(queue.join("pid/master.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        if let Err(e) = wait_banner(postfix.netns.as_deref(), listen, Duration::from_secs(60)) {
            bail!(
                "Postfix smtpd on {listen} did not greet: {e:#}\n{}",
                postfix.diagnose()
            );
        }
        Ok(postfix)
    }

    /// `IP:PORT` smtpd listens on.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The directory given to `start`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The config directory, for `postfix -c`, `postconf -c`, `postqueue -c`.
    pub fn config_dir(&self) -> &Path {
        &self.master.config_dir
    }

    /// Every message the sink received completely (Postfix logged it as
    /// sent), oldest first, as smtp-sink dumped it: `X-Client-Addr`,
    /// `X-Mail-Args`, one `X-Rcpt-Args` per recipient, `Received:` lines, then
    /// the message.
    pub fn delivered(&self) -> Vec<String> {
        let log = self.log_text();
        crate::smtp::sink_dumps(&self.dir.join("sink"))
            .into_iter()
            // smtp-sink creates the file at MAIL and closes it before it
            // answers the final dot; Postfix logs `status=sent` after that.
            .filter(|m| match postfix_queue_id(m) {
                Some(id) => log
                    .lines()
                    .any(|l| l.contains(&format!(" {id}: to=")) && l.contains("status=sent")),
                None => true,
            })
            .collect()
    }

    /// Polls until at least `n` messages were delivered; fails with the log
    /// and the queue after `timeout`.
    pub fn wait_delivered(&self, n: usize, timeout: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.delivered();
            if got.len() >= n {
                return Ok(got);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} of {n} messages delivered within {timeout:?}\n{}",
                    got.len(),
                    self.diagnose()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The whole maillog so far (every Postfix daemon logs there).
    pub fn log_text(&self) -> String {
        std::fs::read(self.dir.join("maillog"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// `postqueue -p`: what is still queued (deferred mail and why).
    pub fn queue_text(&self) -> String {
        // In the namespace: postqueue checks inet_interfaces are local.
        command(self.netns.as_deref(), "postqueue")
            .arg("-c")
            .arg(&self.master.config_dir)
            .arg("-p")
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_else(|e| format!("postqueue: {e}"))
    }

    /// Log, queue and `postfix check` output, for failure messages.
    fn diagnose(&self) -> String {
        // `postfix check` reports to stderr only on a terminal; otherwise to
        // syslog, which a test machine may not have.
        let check = Command::new("script")
            .arg("-qc")
            .arg(format!(
                "postfix -c {} check",
                self.master.config_dir.display()
            ))
            .arg("/dev/null")
            .stdin(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("script: {e}"));
        format!(
            "--- postfix check:\n{check}\n--- queue:\n{}\n--- maillog:\n{}",
            self.queue_text(),
            self.log_text()
        )
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.master.stop();
        let _ = self.sink.kill();
        let _ = self.sink.wait();
    }
}

impl Master {
    /// `postfix stop` (it only signals the master, so it runs on the host even
    /// when the namespace is already gone), then `abort`, then SIGKILL.
    fn stop(&mut self) {
        let postfix = |verb: &str| {
            let _ = Command::new("postfix")
                .arg("-c")
                .arg(&self.config_dir)
                .arg(verb)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        postfix("stop");
        let Some(pid) = self.pid else {
            return;
        };
        if wait_gone(pid, Duration::from_secs(10)) {
            return;
        }
        postfix("abort");
        if wait_gone(pid, Duration::from_secs(5)) {
            return;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        wait_gone(pid, Duration::from_secs(5));
    }
}

/// True once `pid` has exited (gone, or a zombie nobody reaped yet).
fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(") ")
                    .map(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
            })
            .unwrap_or(false);
        if !alive {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn main_cf(
    dir: &Path,
    syslog_name: &str,
    listen: SocketAddr,
    sink: SocketAddr,
    spec: &PostfixSpec,
) -> String {
    let d = dir.display();
    let sink = format!("[{}]:{}", sink.ip(), sink.port());
    format!(
        "# Written by the test fixture tests/sandbox/postfix.rs.
compatibility_level = 3.6
mail_owner = postfix
setgid_group = postdrop
syslog_name = {syslog_name}
queue_directory = {d}/queue
data_directory = {d}/data
# Logs go to a file through the postlog service; Postfix refuses log files
# outside maillog_file_prefixes (default /var, /dev/stdout).
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
myhostname = {HOSTNAME}
mydomain = {LOCAL_DOMAIN}
myorigin = {LOCAL_DOMAIN}
mydestination = {LOCAL_DOMAIN}
inet_interfaces = {ip}
inet_protocols = ipv4
# Loopback (the gatekeeper) is not trusted; it may only send XCLIENT.
mynetworks = 203.0.113.0/24
smtpd_authorized_xclient_hosts = 127.0.0.0/8
local_recipient_maps =
alias_maps =
alias_database =
biff = no
# Local mail and relayed mail alike go to the sink.
local_transport = smtp:{sink}
relayhost = {sink}
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
# Debian's Postfix reads $config_directory/sasl/smtpd.conf in any case.
cyrus_sasl_config_path = {d}/etc/sasl
smtpd_sasl_local_domain = {LOCAL_DOMAIN}
smtpd_tls_security_level = none
smtpd_tls_auth_only = no
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
smtp_tls_security_level = none
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtp_connect_timeout = 5s
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
{extra}
",
        ip = listen.ip(),
        extra = spec.main_cf_extra,
    )
}

/// smtpd on `listen` and the daemons a queue needs; no pickup, no local
/// delivery, nothing chrooted.
fn master_cf(listen: SocketAddr) -> String {
    format!(
        "# service type private unpriv chroot wakeup maxproc command
{listen} inet n - n - - smtpd
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
discard   unix - - n - - discard
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
smtp      unix - - n - - smtp
postlog   unix-dgram n - n - 1 postlogd
"
    )
}

/// `saslpasswd2 -p -c -f SASLDB -u REALM USER`, password on stdin.
fn add_sasl_user(sasldb: &Path, login: &str, password: &str) -> Result<()> {
    let (user, realm) = login.rsplit_once('@').unwrap_or((login, LOCAL_DOMAIN));
    let mut child = Command::new("saslpasswd2")
        .args(["-p", "-c", "-f"])
        .arg(sasldb)
        .args(["-u", realm, user])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running saslpasswd2 (Debian package sasl2-bin)")?;
    child
        .stdin
        .take()
        .context("saslpasswd2 stdin")?
        .write_all(format!("{password}\n").as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "saslpasswd2 for {login} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn command(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(path) => {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net={path}")).arg("--").arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// Connects until the server's 220 greeting arrives, then says QUIT.
fn wait_banner(netns: Option<&str>, addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = move || -> std::io::Result<String> {
            let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line)?;
            let _ = (&stream).write_all(b"QUIT\r\n");
            Ok(line)
        };
        let result = match netns {
            Some(path) => enter_and(path, attempt)?,
            None => attempt(),
        };
        let last = match result {
            Ok(line) if line.starts_with("220 ") => return Ok(()),
            Ok(line) => format!("greeting {line:?}"),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            bail!("no 220 greeting from {addr} within {timeout:?} (last: {last})");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `f` on a thread inside the network namespace at `path`.
fn enter_and<T: Send>(path: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<T> {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering netns {path}"))?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
    })
}

/// The queue id in `Received: ... by mx.example.org (Postfix) with ESMTP id ID;`.
fn postfix_queue_id(message: &str) -> Option<&str> {
    let at = message.find(" (Postfix) with ")?;
    let rest = &message[at..];
    let id = rest.split(" id ").nth(1)?;
    let end = id.find(|c: char| !c.is_ascii_alphanumeric())?;
    Some(&id[..end]).filter(|id| !id.is_empty())
}

/// Adds the search bit for others to every ancestor of `dir` (and `dir`), so
/// unprivileged daemons can reach it. Only ever adds that bit.
fn searchable_ancestors(dir: &Path) -> Result<()> {
    let dir = dir.canonicalize()?;
    for ancestor in dir.ancestors() {
        let mode = std::fs::metadata(ancestor)?.permissions().mode() & 0o7777;
        if mode & 0o001 == 0 {
            std::fs::set_permissions(ancestor, std::fs::Permissions::from_mode(mode | 0o001))?;
        }
    }
    Ok(())
}

fn postfix_ids() -> Result<(u32, u32)> {
    let user = nix::unistd::User::from_name("postfix")?
        .context("no user `postfix` (Debian package postfix)")?;
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}
