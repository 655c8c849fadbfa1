//! Lifetimes of temporary entries, bounded so that expiry arithmetic
//! (unix seconds in the store, monotonic nanoseconds in the kernel) cannot overflow.

use std::time::Duration;

/// The longest TTL accepted: ten years as humantime counts them (`--ttl 10y`).
/// Longer is a typo or an attack; a permanent entry is what the operator means.
pub const MAX_TTL_SECS: u64 = 315_576_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlError {
    #[error("TTL must be at least one second")]
    TooShort,
    #[error("TTL of {0} s is over the maximum of {MAX_TTL_SECS} s (10y); leave it out for a permanent entry")]
    TooLong(u64),
    #[error("the system clock is out of range: cannot compute an expiry")]
    ClockOutOfRange,
}

/// A validated lifetime, 1 s ..= [`MAX_TTL_SECS`]; whole seconds on the wire.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "u64", into = "u64")]
pub struct Ttl(u64);

impl Ttl {
    pub fn from_secs(secs: u64) -> Result<Ttl, TtlError> {
        match secs {
            0 => Err(TtlError::TooShort),
            secs if secs > MAX_TTL_SECS => Err(TtlError::TooLong(secs)),
            secs => Ok(Ttl(secs)),
        }
    }

    /// Sub-second remainders are dropped, so `1500ms` is one second and `500ms` too short.
    pub fn from_duration(duration: Duration) -> Result<Ttl, TtlError> {
        Ttl::from_secs(duration.as_secs())
    }

    pub fn secs(self) -> u64 {
        self.0
    }

    /// The unix second at which an entry added at `now` stops matching:
    /// the one place a TTL becomes an expiry.
    pub fn expires_at(self, now: u64) -> Result<u64, TtlError> {
        now.checked_add(self.0).ok_or(TtlError::ClockOutOfRange)
    }
}

impl TryFrom<u64> for Ttl {
    type Error = TtlError;

    fn try_from(secs: u64) -> Result<Ttl, TtlError> {
        Ttl::from_secs(secs)
    }
}

impl From<Ttl> for u64 {
    fn from(ttl: Ttl) -> u64 {
        ttl.0
    }
}

/// `--ttl` values: humantime syntax (`90s`, `1h`, `7d`), then the bounds.
pub fn parse_ttl_arg(text: &str) -> Result<Ttl, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    Ttl::from_duration(duration).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_enforced_on_every_path() {
        assert_eq!(Ttl::from_secs(0), Err(TtlError::TooShort));
        assert_eq!(Ttl::from_secs(1).unwrap().secs(), 1);
        assert_eq!(Ttl::from_secs(MAX_TTL_SECS).unwrap().secs(), MAX_TTL_SECS);
        assert_eq!(
            Ttl::from_secs(MAX_TTL_SECS + 1),
            Err(TtlError::TooLong(MAX_TTL_SECS + 1))
        );
        assert!(serde_json::from_str::<Ttl>("0").is_err());
        assert!(serde_json::from_str::<Ttl>("18446744074").is_err());
        assert!(serde_json::from_str::<Ttl>("-1").is_err());
        assert!(serde_json::from_str::<Ttl>("1.5").is_err());
        assert_eq!(serde_json::from_str::<Ttl>("60").unwrap().secs(), 60);
        assert_eq!(serde_json::to_string(&Ttl(60)).unwrap(), "60");
    }

    #[test]
    fn cli_syntax_and_bounds() {
        assert_eq!(parse_ttl_arg("1h").unwrap().secs(), 3600);
        assert_eq!(parse_ttl_arg("1500ms").unwrap().secs(), 1);
        assert_eq!(parse_ttl_arg("10y").unwrap().secs(), MAX_TTL_SECS);
        for bad in ["500ms", "0s", "18446744074s", "11y", "forever"] {
            assert!(parse_ttl_arg(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn expiry_never_wraps() {
        let ttl = Ttl::from_secs(MAX_TTL_SECS).unwrap();
        assert_eq!(ttl.expires_at(1_000), Ok(1_000 + MAX_TTL_SECS));
        assert_eq!(ttl.expires_at(u64::MAX - 5), Err(TtlError::ClockOutOfRange));
    }
}
