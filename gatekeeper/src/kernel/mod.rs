//! Where verdicts enter the kernel: loading, attaching and pinning the XDP
//! program, and typed handles on its maps.

mod batch;
mod block_bitmaps;
mod dnsbl_maps;
mod driver;
mod exact_slots;
mod loader;
mod mapped;
mod maps;
mod preflight;

pub use dnsbl_maps::{DnsblEntry, DnsblMaps, PrefixView};
pub use loader::{AttachedMode, Kernel, KernelStatus, ListMaps};
pub use maps::PrefixMaps;
pub use preflight::check_privileges;
