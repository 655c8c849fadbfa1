//! Feeds: lists fetched from a URL or read from a file on an interval,
//! each owning its own entries in the deny or allow list.
//!
//! Pure parts only (config, fetch, durable validators); the scheduler that
//! applies refreshes to the lists lives in `daemon::feeds`.

pub mod config;
pub mod fetch;
pub mod state;

pub use config::FeedConfig;
