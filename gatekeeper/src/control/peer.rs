//! Who may use the control socket: root, the daemon's own user, and members
//! of `control_group`, judged from the kernel's record of the peer
//! (`SO_PEERCRED`, `SO_PEERGROUPS`) as it was when it connected.

use std::os::fd::{AsRawFd, BorrowedFd};

use anyhow::{bail, Result};
use nix::unistd::{Gid, Group};

/// The peer as the kernel saw it at `connect()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ControlGroup {
    name: String,
    gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    daemon_uid: u32,
    group: Option<ControlGroup>,
}

impl Access {
    /// Looks `control_group` up (a group name, or a numeric gid when no group has that name).
    pub fn resolve(control_group: Option<&str>) -> Result<Access> {
        let group = match control_group {
            None => None,
            Some(name) => {
                let gid = match Group::from_name(name) {
                    Ok(Some(group)) => group.gid.as_raw(),
                    Ok(None) | Err(_) => match name.parse::<u32>() {
                        Ok(gid) => gid,
                        Err(_) => bail!("control_group: no such group '{name}'"),
                    },
                };
                Some(ControlGroup {
                    name: name.to_owned(),
                    gid,
                })
            }
        };
        Ok(Access {
            daemon_uid: nix::unistd::geteuid().as_raw(),
            group,
        })
    }

    /// File mode of the socket: only the owner, or the owner and the control group.
    pub fn socket_mode(&self) -> u32 {
        if self.group.is_some() {
            0o660
        } else {
            0o600
        }
    }

    pub fn socket_group(&self) -> Option<Gid> {
        self.group.as_ref().map(|g| Gid::from_raw(g.gid))
    }

    /// Admits or refuses the peer on `socket`; the refusal is the message to send back.
    pub fn check(&self, socket: BorrowedFd<'_>, peer: &Peer) -> Result<(), String> {
        if self.is_privileged(peer.uid) {
            return Ok(());
        }
        let Some(group) = &self.group else {
            return Err(format!(
                "permission denied: uid {} may not use the control socket (root only; set control_group to admit a group)",
                peer.uid
            ));
        };
        if peer.gid == group.gid {
            return Ok(());
        }
        match peer_groups(socket) {
            Ok(groups) if groups.contains(&group.gid) => Ok(()),
            Ok(_) => Err(format!(
                "permission denied: uid {} is not root and not in control_group '{}'",
                peer.uid, group.name
            )),
            Err(e) => Err(format!(
                "permission denied: cannot read the groups of uid {} ({e})",
                peer.uid
            )),
        }
    }

    fn is_privileged(&self, uid: u32) -> bool {
        uid == 0 || uid == self.daemon_uid
    }
}

/// The peer's supplementary groups at connect time.
fn peer_groups(socket: BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    const GID_BYTES: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * GID_BYTES) as libc::socklen_t;
        // SAFETY: the buffer holds `len` bytes and outlives the call; `socket` is an open fd.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / GID_BYTES;
        if rc == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let error = std::io::Error::last_os_error();
        // ERANGE reports the size needed; anything else is final.
        if error.raw_os_error() != Some(libc::ERANGE) || needed <= groups.len() {
            return Err(error);
        }
        groups.resize(needed, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn access(group: Option<u32>) -> Access {
        Access {
            daemon_uid: 4000,
            group: group.map(|gid| ControlGroup {
                name: "gkctl".into(),
                gid,
            }),
        }
    }

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            uid,
            gid,
            pid: None,
        }
    }

    #[test]
    fn root_and_the_daemons_user_are_served_others_refused() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = a.as_fd();
        let root_only = access(None);
        assert_eq!(root_only.check(fd, &peer(0, 0)), Ok(()));
        assert_eq!(root_only.check(fd, &peer(4000, 4000)), Ok(()));
        let refusal = root_only.check(fd, &peer(65534, 65534)).unwrap_err();
        assert!(refusal.contains("uid 65534"), "{refusal}");
        assert_eq!(root_only.socket_mode(), 0o600);
    }

    #[test]
    fn control_group_admits_its_primary_members() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let grouped = access(Some(4242));
        assert_eq!(grouped.check(a.as_fd(), &peer(65534, 4242)), Ok(()));
        assert_eq!(grouped.socket_mode(), 0o660);
        assert_eq!(grouped.socket_group(), Some(Gid::from_raw(4242)));
    }

    #[test]
    fn supplementary_groups_come_from_the_kernel() {
        // A socketpair's peer is this process: its own groups are what SO_PEERGROUPS reports.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut own: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .iter()
            .map(|g| g.as_raw())
            .collect();
        let mut reported = peer_groups(a.as_fd()).unwrap();
        own.sort_unstable();
        reported.sort_unstable();
        assert_eq!(reported, own);
        if let Some(&member) = own.first() {
            let grouped = access(Some(member));
            assert_eq!(grouped.check(a.as_fd(), &peer(65534, 65534)), Ok(()));
        }
        // A group we are not in is refused for a stranger whose primary gid differs.
        let not_ours = (1..u32::MAX)
            .find(|g| !own.contains(g) && *g != 65534)
            .unwrap();
        let refusal = access(Some(not_ours))
            .check(a.as_fd(), &peer(65534, 65534))
            .unwrap_err();
        assert!(refusal.contains("control_group 'gkctl'"), "{refusal}");
    }

    #[test]
    fn numeric_group_is_accepted_unknown_name_refused() {
        assert_eq!(
            Access::resolve(Some("4242")).unwrap().socket_group(),
            Some(Gid::from_raw(4242))
        );
        let err = Access::resolve(Some("gk-no-such-group")).unwrap_err();
        assert!(err.to_string().contains("control_group"), "{err}");
    }
}
