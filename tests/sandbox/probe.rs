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

/// An AF_PACKET socket on one interface of the current namespace: for
/// sending (`protocol` 0) or, bound to `ETH_P_ALL`, for receiving every frame.
struct PacketSocket {
    fd: std::os::fd::OwnedFd,
    index: i32,
}

impl PacketSocket {
    fn open(interface: &str) -> Result<PacketSocket> {
        Self::open_for(interface, 0)
    }

    fn open_for(interface: &str, protocol: u16) -> Result<PacketSocket> {
        let index = nix::net::if_::if_nametoindex(interface)? as i32;
        // SAFETY: plain socket(2) call; the fd is owned by OwnedFd below.
        let fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol.to_be())) };
        anyhow::ensure!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(PacketSocket { fd, index })
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
        let sender = PacketSocket::open(&interface)?;
        for frame in &frames {
            sender
                .send(frame)
                .with_context(|| format!("sending a {}-byte frame", frame.len()))?;
        }
        Ok(())
    })?
}

/// Every frame arriving on one interface of a namespace, from the moment it is opened.
pub struct RawReceiver(PacketSocket);

impl RawReceiver {
    pub fn open(ns: &Netns, interface: &str) -> Result<RawReceiver> {
        let interface = interface.to_owned();
        let socket =
            ns.run(move || PacketSocket::open_for(&interface, libc::ETH_P_ALL as u16))??;
        // SAFETY: zeroed sockaddr_ll is valid; we fill the fields bind needs.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = socket.index;
        // SAFETY: the address pointer is valid for the length given.
        let bound = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&socket.fd),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        anyhow::ensure!(
            bound == 0,
            "binding AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        Ok(RawReceiver(socket))
    }

    /// Reads frames until `done` accepts one (true) or `patience` passes without (false).
    pub fn wait_for(&self, patience: Duration, mut done: impl FnMut(&[u8]) -> bool) -> bool {
        let deadline = std::time::Instant::now() + patience;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            let mut poll = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.0.fd),
                events: libc::POLLIN,
                revents: 0,
            };
            let millis = left.as_millis().clamp(1, 1000) as i32;
            // SAFETY: one valid pollfd for the duration of the call.
            if unsafe { libc::poll(&mut poll, 1, millis) } <= 0 {
                continue;
            }
            // SAFETY: the buffer is valid for its length; MSG_DONTWAIT never blocks.
            let len = unsafe {
                libc::recv(
                    std::os::fd::AsRawFd::as_raw_fd(&self.0.fd),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if len > 0 && done(&buf[..len as usize]) {
                return true;
            }
        }
    }
}

/// Whether `frame` (untagged Ethernet) is a TCP SYN-ACK from port `from_port` to `to`.
pub fn is_syn_ack_to(frame: &[u8], from_port: u16, to: SocketAddr) -> bool {
    let ethertype = frame.get(12..14).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let (tcp, dest) = match (ethertype, frame.get(14..)) {
        (Some(0x0800), Some(ip)) if ip.len() >= 20 && ip[9] == 6 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let dest: [u8; 4] = ip[16..20].try_into().expect("4 octets");
            (ip.get(ihl..), IpAddr::from(dest))
        }
        (Some(0x86dd), Some(ip)) if ip.len() >= 40 && ip[6] == 6 => {
            let dest: [u8; 16] = ip[24..40].try_into().expect("16 octets");
            (ip.get(40..), IpAddr::from(dest))
        }
        _ => return false,
    };
    matches!(tcp, Some(t) if t.len() >= 20
        && u16::from_be_bytes([t[0], t[1]]) == from_port
        && u16::from_be_bytes([t[2], t[3]]) == to.port()
        && t[13] & 0x12 == 0x12)
        && dest == to.ip()
}
