//! Loads the embedded XDP object, attaches it, pins its maps and undoes all
//! of that on shutdown.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{anyhow, Context, Result};
use aya::maps::{Array, HashMap, IterableMap, LpmTrie, Map, MapData, PerCpuArray};
use aya::programs::{ProgramError, Xdp, XdpMode};
use aya::{Ebpf, EbpfError, EbpfLoader};
use gatekeeper_common::map_names;
use tracing::{debug, info, warn};

use super::block_bitmaps::{BlockBitmaps, KernelBitmap};
use super::dnsbl_maps::DnsblMaps;
use super::exact_slots::{self, ExactSlots};
use super::maps::{read_counters, CounterSnapshot, ExactEntries, ExactMaps, PrefixMaps};
use super::preflight;
use crate::config::{Config, XdpModeSetting};

/// The eBPF object built by `cargo xtask build`, embedded so the binary is self-contained.
static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("GATEKEEPER_XDP_OBJECT"));
const PROGRAM_NAME: &str = "gatekeeper";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachedMode {
    Native,
    Skb,
}

struct Attachment {
    interface: String,
    mode: AttachedMode,
    link: aya::programs::xdp::XdpLinkId,
}

/// The loaded program and its attachments and pins. Whoever owns it owns
/// the teardown (see `Drop`); the maps are handed to the services that
/// write them (`take_*`), which may outlive it harmlessly: a map handle
/// keeps a map alive, never an attachment or a pin.
pub struct Kernel {
    ebpf: Ebpf,
    attachments: Vec<Attachment>,
    /// What `stats` reports; kept in step with `attachments` (reload changes them).
    attached: SharedAttachments,
    ports: Array<MapData, u8>,
    protected: Vec<u16>,
    lists: Option<ListMaps>,
    counters: Option<PerCpuArray<MapData, u64>>,
    dnsbl: Option<DnsblMaps>,
    pin_dir: PathBuf,
}

/// The deny and allow maps, for the list service.
pub struct ListMaps {
    pub deny: PrefixMaps,
    pub allow: PrefixMaps,
}

type SharedAttachments = Arc<Mutex<Vec<(String, AttachedMode)>>>;

/// What `stats` reads of the kernel: the counters and where XDP is attached.
pub struct KernelStatus {
    counters: PerCpuArray<MapData, u64>,
    attachments: SharedAttachments,
}

impl KernelStatus {
    pub fn counters(&self) -> Result<CounterSnapshot> {
        read_counters(&self.counters)
    }

    pub fn attachments(&self) -> Vec<(String, AttachedMode)> {
        self.attachments
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Kernel {
    /// Loads and verifies the program, sizes and pins its maps, marks the
    /// protected ports. Nothing is attached yet, so lists can be loaded first
    /// and no SYN is ever judged against a half-filled map.
    pub fn load(config: &Config) -> Result<Kernel> {
        preflight::check_interfaces(&config.interfaces)?;
        preflight::prepare_bpffs_dir(&config.bpffs_dir)?;
        let reclaimed = remove_stale_pins(&config.bpffs_dir)?;
        if reclaimed > 0 {
            warn!(
                pins = reclaimed,
                dir = %config.bpffs_dir.display(),
                "reclaimed the map pins of a daemon that did not stop cleanly (killed or crashed)"
            );
        }

        let caps = config.maps;
        let slot_buckets = exact_slots::buckets_for(caps.deny_v4);
        let slot_shift = exact_slots::shift_for(slot_buckets);
        // aya-log level inside XDP: off unless debug logging is on for gatekeeper.
        let log_level: u8 = if tracing::enabled!(target: "gatekeeper_xdp", tracing::Level::DEBUG) {
            4
        } else {
            0
        };
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::DENY_V4, caps.deny_v4)
            .map_max_entries(map_names::DENY_V6, caps.deny_v6)
            .map_max_entries(map_names::DENY_V4_EXACT, caps.deny_v4)
            .map_max_entries(map_names::DENY_V6_EXACT, caps.deny_v6)
            .map_max_entries(map_names::DENY_V4_SLOTS, slot_buckets)
            .map_max_entries(map_names::ALLOW_V4, caps.allow_v4)
            .map_max_entries(map_names::ALLOW_V6, caps.allow_v6)
            .map_max_entries(map_names::DNSBL_V4, caps.dnsbl_v4)
            .map_max_entries(map_names::DNSBL_V6, caps.dnsbl_v6)
            .override_global(aya_log::LEVEL, &log_level, false)
            .override_global(gatekeeper_common::EXACT_V4_SHIFT, &slot_shift, true)
            .load(XDP_OBJECT)
            .map_err(describe_load_error)?;
        if log_level > 0 {
            start_xdp_logger(&mut ebpf);
        }

        xdp_program(&mut ebpf)?
            .load()
            .map_err(describe_program_error)?;

        for name in map_names::ALL {
            let map = ebpf
                .map(name)
                .with_context(|| format!("map {name} missing from the embedded object"))?;
            let path = config.bpffs_dir.join(name);
            map.pin(&path)
                .with_context(|| format!("pinning map {name} at {}", path.display()))?;
        }

        let ports: Array<MapData, u8> = take(&mut ebpf, map_names::PROTECTED_PORTS)?;

        let deny = PrefixMaps::new(
            take::<LpmTrie<_, _, _>>(&mut ebpf, map_names::DENY_V4)?,
            take::<LpmTrie<_, _, _>>(&mut ebpf, map_names::DENY_V6)?,
            Some(ExactEntries {
                hashes: ExactMaps {
                    v4: take::<HashMap<_, _, _>>(&mut ebpf, map_names::DENY_V4_EXACT)?,
                    v6: take::<HashMap<_, _, _>>(&mut ebpf, map_names::DENY_V6_EXACT)?,
                },
                slots_v4: map_slots(&mut ebpf, slot_buckets)?,
            }),
            None,
            Some(BlockBitmaps::new(
                take::<Array<_, _>>(&mut ebpf, map_names::DENY_V4_COVER)?,
                take::<Array<_, _>>(&mut ebpf, map_names::DENY_V4_TRIE_HINT)?,
                take::<Array<_, _>>(&mut ebpf, map_names::DENY_V4_EXACT_HINT)?,
            )),
            caps.deny_v4,
            caps.deny_v6,
        );
        let allow = PrefixMaps::new(
            take::<LpmTrie<_, _, _>>(&mut ebpf, map_names::ALLOW_V4)?,
            take::<LpmTrie<_, _, _>>(&mut ebpf, map_names::ALLOW_V6)?,
            None,
            Some(take::<Array<_, _>>(&mut ebpf, map_names::ALLOW_PRESENT)?),
            None,
            caps.allow_v4,
            caps.allow_v6,
        );
        let counters = take(&mut ebpf, map_names::COUNTERS)?;
        let dnsbl = DnsblMaps::new(
            take::<HashMap<_, _, _>>(&mut ebpf, map_names::DNSBL_V4)?,
            take::<HashMap<_, _, _>>(&mut ebpf, map_names::DNSBL_V6)?,
            KernelBitmap::new(take::<Array<_, _>>(&mut ebpf, map_names::DNSBL_V4_HINT)?),
        );
        let mut kernel = Kernel {
            ebpf,
            attachments: Vec::new(),
            attached: SharedAttachments::default(),
            ports,
            protected: Vec::new(),
            lists: Some(ListMaps { deny, allow }),
            counters: Some(counters),
            dnsbl: Some(dnsbl),
            pin_dir: config.bpffs_dir.clone(),
        };
        kernel.set_protected_ports(&config.protected_ports)?;
        Ok(kernel)
    }

    /// Makes exactly `wanted` the ports whose SYNs XDP judges; live, so a
    /// reload takes effect with the next SYN.
    pub fn set_protected_ports(&mut self, wanted: &[u16]) -> Result<()> {
        for &port in wanted {
            if !self.protected.contains(&port) {
                self.ports
                    .set(u32::from(port), 1, 0)
                    .with_context(|| format!("marking port {port} protected"))?;
                self.protected.push(port);
            }
        }
        for port in self.protected.clone() {
            if !wanted.contains(&port) {
                self.ports
                    .set(u32::from(port), 0, 0)
                    .with_context(|| format!("unmarking port {port}"))?;
                self.protected.retain(|&p| p != port);
            }
        }
        Ok(())
    }

    /// Attaches to the interfaces in `wanted` that lack the program and
    /// detaches it from those not in it. Attaching comes first and is undone
    /// on failure, so a failed change leaves the attachments as they were.
    pub fn set_interfaces(&mut self, wanted: &[String], mode: XdpModeSetting) -> Result<()> {
        let new: Vec<String> = wanted
            .iter()
            .filter(|name| !self.attachments.iter().any(|a| &a.interface == *name))
            .cloned()
            .collect();
        preflight::check_interfaces(&new)?;
        let before = self.attachments.len();
        if let Err(e) = self.attach(&new, mode) {
            for attachment in self.attachments.split_off(before) {
                self.detach(attachment);
            }
            self.publish_attachments();
            return Err(e);
        }
        let (keep, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.attachments)
            .into_iter()
            .partition(|a| wanted.contains(&a.interface));
        self.attachments = keep;
        for attachment in gone {
            self.detach(attachment);
        }
        self.publish_attachments();
        Ok(())
    }

    fn detach(&mut self, attachment: Attachment) {
        let Ok(program) = xdp_program(&mut self.ebpf) else {
            return;
        };
        match program.detach(attachment.link) {
            Ok(()) => info!(interface = %attachment.interface, "XDP detached"),
            Err(e) => warn!(interface = %attachment.interface, error = %e, "XDP detach failed"),
        }
    }

    fn publish_attachments(&self) {
        *self.attached.lock().unwrap_or_else(PoisonError::into_inner) = self.attachments();
    }

    /// Attaches to every interface; `auto` uses generic mode on veth and
    /// elsewhere tries native mode, falling back to generic.
    pub fn attach(&mut self, interfaces: &[String], mode: XdpModeSetting) -> Result<()> {
        let program = xdp_program(&mut self.ebpf)?;
        for interface in interfaces {
            let (link, attached) = match mode {
                XdpModeSetting::Native => (
                    program
                        .attach(interface, XdpMode::Driver)
                        .with_context(|| format!("attaching XDP (native) to {interface}"))?,
                    AttachedMode::Native,
                ),
                XdpModeSetting::Skb => (
                    program
                        .attach(interface, XdpMode::Skb)
                        .with_context(|| format!("attaching XDP (skb) to {interface}"))?,
                    AttachedMode::Skb,
                ),
                XdpModeSetting::Auto
                    if super::driver::driver_name(interface).as_deref() == Some("veth") =>
                {
                    info!(%interface, "veth: using generic (skb) XDP; native mode on veth gains nothing over it (the sender already built the skb) and was seen to starve under a flood (set xdp_mode = \"native\" to force it)");
                    let link = program
                        .attach(interface, XdpMode::Skb)
                        .with_context(|| format!("attaching XDP (skb) to {interface}"))?;
                    (link, AttachedMode::Skb)
                }
                XdpModeSetting::Auto => match program.attach(interface, XdpMode::Driver) {
                    Ok(link) => (link, AttachedMode::Native),
                    Err(e) => {
                        info!(%interface, error = %e, "native XDP unavailable, falling back to generic (skb) mode");
                        let link = program
                            .attach(interface, XdpMode::Skb)
                            .with_context(|| format!("attaching XDP (skb) to {interface}"))?;
                        (link, AttachedMode::Skb)
                    }
                },
            };
            info!(%interface, mode = ?attached, "XDP attached");
            self.attachments.push(Attachment {
                interface: interface.clone(),
                mode: attached,
                link,
            });
        }
        self.publish_attachments();
        Ok(())
    }

    pub fn attachments(&self) -> Vec<(String, AttachedMode)> {
        self.attachments
            .iter()
            .map(|a| (a.interface.clone(), a.mode))
            .collect()
    }

    /// The deny and allow maps, for the list service; `None` after the first call.
    pub fn take_list_maps(&mut self) -> Option<ListMaps> {
        self.lists.take()
    }

    /// Counters and attachments, once XDP is attached; `None` after the first call.
    pub fn take_status(&mut self) -> Option<KernelStatus> {
        Some(KernelStatus {
            counters: self.counters.take()?,
            attachments: self.attached.clone(),
        })
    }

    /// The DNSBL maps, for whoever feeds verdicts into them; `None` after the first call.
    pub fn take_dnsbl_maps(&mut self) -> Option<DnsblMaps> {
        self.dnsbl.take()
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

/// Teardown is tied to ownership, so every exit path (clean stop, a failed
/// start-up, an error or a panic unwinding out of `run`) detaches and unpins.
impl Drop for Kernel {
    fn drop(&mut self) {
        for attachment in std::mem::take(&mut self.attachments) {
            self.detach(attachment);
        }
        match remove_stale_pins(&self.pin_dir) {
            Ok(pins) => info!(pins, dir = %self.pin_dir.display(), "map pins removed"),
            Err(e) => warn!(error = %format!("{e:#}"), "removing pinned maps failed"),
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
        info!("kernel teardown complete");
    }
}

/// The embedded object's one XDP program.
fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    Ok(ebpf
        .program_mut(PROGRAM_NAME)
        .context("XDP program missing from the embedded object")?
        .try_into()?)
}

fn take<T: TryFrom<Map>>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T::Error: std::error::Error + Send + Sync + 'static,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the embedded object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// The slot table through a shared mapping (which keeps the map alive).
fn map_slots(ebpf: &mut Ebpf, buckets: u32) -> Result<ExactSlots> {
    let array: Array<MapData, gatekeeper_common::ExactBucket> =
        take(ebpf, map_names::DENY_V4_SLOTS)?;
    ExactSlots::map(array.map(), buckets).with_context(|| {
        format!(
            "mapping {} into the daemon (the kernel must support BPF_F_MMAPABLE arrays, Linux 5.5+)",
            map_names::DENY_V4_SLOTS
        )
    })
}

/// Pins left by a daemon that died are dead weight: its program went with
/// it. Returns how many were removed.
fn remove_stale_pins(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for name in map_names::ALL {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                debug!(path = %path.display(), "removed pin");
                removed += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(removed)
}

fn describe_load_error(error: EbpfError) -> anyhow::Error {
    match error {
        EbpfError::MapError(e) => anyhow!("creating the XDP program's maps failed: {e}"),
        other => anyhow!("loading the XDP object failed: {other}"),
    }
}

fn describe_program_error(error: ProgramError) -> anyhow::Error {
    match error {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            debug!("verifier log:\n{verifier_log}");
            anyhow!(
                "the kernel verifier rejected the XDP program ({io_error}); run with RUST_LOG=debug for the verifier log"
            )
        }
        other => anyhow!("loading the XDP program failed: {other}"),
    }
}

fn start_xdp_logger(ebpf: &mut Ebpf) {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => {
            // SAFETY: the AsyncFd owns the logger, and with it the ring buffer fd, until deregistration.
            let registered = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    logger,
                    tokio::io::Interest::READABLE,
                )
            };
            let Ok(mut fd) = registered else {
                warn!("cannot poll the XDP log ring");
                return;
            };
            tokio::spawn(async move {
                while let Ok(mut guard) = fd.readable_mut().await {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        Err(e) => warn!(error = %e, "XDP logging unavailable"),
    }
}
