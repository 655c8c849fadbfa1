//! What a client sees: connections made, refused or silently dropped.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};
use socket2::{Domain, Socket, Type};

use crate::netns::Netns;

/// How long a SYN may go unanswered before we call it dropped. A passed SYN
/// is answered within milliseconds on veth.
pub const DROP_TIMEOUT: Duration = Duration::from_millis(1500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Connected,
    /// RST: the SYN reached the edge's kernel, so XDP passed it.
    Refused,
    /// No answer: the SYN died on the way, i.e. in XDP.
    TimedOut,
}

/// Connects from `source` (an address of `ns`) to `dest`.
pub fn connect_from(
    ns: &Netns,
    source: IpAddr,
    dest: SocketAddr,
) -> Result<(Outcome, Option<TcpStream>)> {
    ns.run(move || -> Result<(Outcome, Option<TcpStream>)> {
        let socket = Socket::new(Domain::for_address(dest), Type::STREAM, None)?;
        socket
            .bind(&SocketAddr::new(source, 0).into())
            .with_context(|| format!("binding {source}"))?;
        match socket.connect_timeout(&dest.into(), DROP_TIMEOUT) {
            Ok(()) => Ok((Outcome::Connected, Some(socket.into()))),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Ok((Outcome::Refused, None))
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::TimedOut
                    || e.kind() == std::io::ErrorKind::WouldBlock =>
            {
                Ok((Outcome::TimedOut, None))
            }
            Err(e) => Err(e).with_context(|| format!("connecting {source} -> {dest}")),
        }
    })?
}

pub fn outcome(ns: &Netns, source: &str, dest: &str) -> Outcome {
    let source: IpAddr = source.parse().expect("source address");
    let dest: SocketAddr = dest.parse().expect("destination socket address");
    connect_from(ns, source, dest)
        .unwrap_or_else(|e| panic!("probe {source} -> {dest}: {e:#}"))
        .0
}

/// A dual-stack listener in `ns` that accepts and keeps connections open
/// (echoing what it reads), until the process ends.
pub fn listen(ns: &Netns, port: u16) -> Result<()> {
    let listener = ns.run(move || -> Result<TcpListener> {
        let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        socket.set_only_v6(false)?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::from(([0u16; 8], port)).into())?;
        socket.listen(128)?;
        Ok(socket.into())
    })??;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().expect("clone");
                let mut writer = stream;
                let _ = std::io::copy(&mut reader, &mut writer);
            });
        }
    });
    Ok(())
}

/// An AF_PACKET socket bound for sending on one interface of the current namespace.
struct RawSender {
    fd: std::os::fd::OwnedFd,
    index: i32,
}

impl RawSender {
    fn open(interface: &str) -> Result<RawSender> {
        let index = nix::net::if_::if_nametoindex(interface)? as i32;
        // SAFETY: plain socket(2) call; the fd is owned by OwnedFd below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        anyhow::ensure!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(RawSender { fd, index })
    }

    /// Whether the whole frame went out.
    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: zeroed sockaddr_ll is valid; we fill the fields sendto needs.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.index;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: buffer and address pointers are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent == frame.len() as isize {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// Sends raw Ethernet frames out of `interface` in `ns` (AF_PACKET).
pub fn send_raw_frames(ns: &Netns, interface: &str, frames: &[Vec<u8>]) -> Result<()> {
    let interface = interface.to_owned();
    let frames = frames.to_vec();
    ns.run(move || -> Result<()> {
        let sender = RawSender::open(&interface)?;
        for frame in &frames {
            sender
                .send(frame)
                .with_context(|| format!("sending a {}-byte frame", frame.len()))?;
        }
        Ok(())
    })?
}
