//! The daemon's side of the fleet link: received verdicts go through the
//! list service like any change (durable, then in the kernel), and local
//! policy (allowlist, relay networks) decides what the fleet may drop here.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use ipnet::IpNet;

use super::lists::ListService;
use super::screen::ScreenService;
use crate::cluster::Fleet;
use crate::lists::store::Change;
use crate::lists::ListKind;

pub struct FleetService {
    pub lists: Arc<ListService>,
    pub screen: Arc<ScreenService>,
}

impl Fleet for FleetService {
    fn apply(
        &self,
        list: ListKind,
        change: Change,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            self.lists
                .change(list, change)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn exempt(&self, net: &IpNet) -> bool {
        self.lists.overlaps(ListKind::Allow, net) || self.screen.overlaps_relay_networks(net)
    }
}
