//! Quota windows: fixed, aligned to UTC.

/// The accepted values of `period`, for error messages.
pub const PERIODS: &str = "\"minute\", \"hour\" or \"day\"";

/// A fixed window, aligned to UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Minute,
    Hour,
    Day,
}

impl Period {
    /// The window's length in seconds.
    pub fn seconds(self) -> u64 {
        match self {
            Period::Minute => 60,
            Period::Hour => 3_600,
            Period::Day => 86_400,
        }
    }

    /// The start (seconds since the Unix epoch) of the window holding
    /// `now_secs`.
    pub fn window_start(self, now_secs: u64) -> u64 {
        now_secs - now_secs % self.seconds()
    }

    /// The configuration name of the period.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Minute => "minute",
            Period::Hour => "hour",
            Period::Day => "day",
        }
    }

    /// Reads a configuration name (`minute`, `hour`, `day`).
    pub fn from_name(name: &str) -> Option<Period> {
        match name {
            "minute" => Some(Period::Minute),
            "hour" => Some(Period::Hour),
            "day" => Some(Period::Day),
            _ => None,
        }
    }
}
