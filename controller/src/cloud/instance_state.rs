//! An EC2 instance's state, parsed once at the EC2 boundary: every caller
//! matches on [`InstanceState`] instead of comparing EC2's strings. Its
//! [`Display`](std::fmt::Display) is EC2's own spelling (and `gone` for an
//! instance EC2 does not know), so what is printed or stored as text is
//! what it was when states were strings.

use std::fmt;

/// The state of an instance as DescribeInstances (or
/// DescribeInstanceStatus) reports it, plus [`InstanceState::Gone`] for an
/// instance EC2 no longer knows (not found).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum InstanceState {
    Pending,
    Running,
    Stopping,
    Stopped,
    ShuttingDown,
    Terminated,
    /// EC2 does not know the instance (never launched, or terminated long
    /// enough ago to be forgotten).
    Gone,
    /// A state EC2 did not use when this was written, or none at all
    /// (`""`): kept as EC2 spelled it.
    #[default]
    Unknown,
    /// See [`InstanceState::Unknown`]: a spelling this enum does not know.
    Other(String),
}

impl InstanceState {
    /// Every named state (for tests and filters), without `Unknown`/`Other`.
    pub const ALL: [InstanceState; 7] = [
        InstanceState::Pending,
        InstanceState::Running,
        InstanceState::Stopping,
        InstanceState::Stopped,
        InstanceState::ShuttingDown,
        InstanceState::Terminated,
        InstanceState::Gone,
    ];

    /// Parses EC2's spelling (`pending`, `running`, `stopping`, `stopped`,
    /// `shutting-down`, `terminated`; `gone` is ours). The one place where
    /// EC2's strings are read.
    pub fn parse(s: &str) -> Self {
        match s {
            "pending" => InstanceState::Pending,
            "running" => InstanceState::Running,
            "stopping" => InstanceState::Stopping,
            "stopped" => InstanceState::Stopped,
            "shutting-down" => InstanceState::ShuttingDown,
            "terminated" => InstanceState::Terminated,
            "gone" => InstanceState::Gone,
            "" => InstanceState::Unknown,
            other => InstanceState::Other(other.to_owned()),
        }
    }

    /// The state of a described instance, [`InstanceState::Gone`] when EC2
    /// did not know it.
    pub fn of(instance: Option<&super::ec2::Instance>) -> Self {
        instance.map(|i| i.state.clone()).unwrap_or(InstanceState::Gone)
    }

    /// EC2's spelling (`gone` for [`InstanceState::Gone`], `""` when EC2
    /// gave none).
    pub fn as_str(&self) -> &str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
            InstanceState::ShuttingDown => "shutting-down",
            InstanceState::Terminated => "terminated",
            InstanceState::Gone => "gone",
            InstanceState::Unknown => "",
            InstanceState::Other(s) => s,
        }
    }

    /// Pending or running: the instance is (coming) up.
    pub fn is_up(&self) -> bool {
        matches!(self, InstanceState::Pending | InstanceState::Running)
    }

    /// Shutting down, terminated or gone: it will never run again.
    pub fn is_ending(&self) -> bool {
        matches!(self, InstanceState::ShuttingDown | InstanceState::Terminated | InstanceState::Gone)
    }

    /// Stopped, or ending ([`InstanceState::is_ending`]): it runs nothing.
    pub fn is_down(&self) -> bool {
        *self == InstanceState::Stopped || self.is_ending()
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for InstanceState {
    fn from(s: &str) -> Self {
        InstanceState::parse(s)
    }
}

impl From<String> for InstanceState {
    fn from(s: String) -> Self {
        InstanceState::parse(&s)
    }
}

/// Test doubles and assertions that still spell states as EC2 does.
impl PartialEq<&str> for InstanceState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for InstanceState {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec2_spellings_parse_and_print_back() {
        for (text, state) in [
            ("pending", InstanceState::Pending),
            ("running", InstanceState::Running),
            ("stopping", InstanceState::Stopping),
            ("stopped", InstanceState::Stopped),
            ("shutting-down", InstanceState::ShuttingDown),
            ("terminated", InstanceState::Terminated),
            ("gone", InstanceState::Gone),
        ] {
            assert_eq!(InstanceState::parse(text), state, "{text}");
            assert_eq!(state.to_string(), text, "{state:?} prints as EC2 spells it");
        }
        for s in InstanceState::ALL {
            assert_eq!(InstanceState::parse(&s.to_string()), s, "{s:?} round-trips");
        }
        assert_eq!(InstanceState::parse(""), InstanceState::Unknown);
        assert_eq!(InstanceState::parse("rebooting"), InstanceState::Other("rebooting".into()));
        assert_eq!(InstanceState::parse("rebooting").to_string(), "rebooting", "an unknown state is kept as EC2 spelled it");
        assert_eq!(InstanceState::of(None), InstanceState::Gone, "not found is gone");
    }

    #[test]
    fn groups() {
        use InstanceState::*;
        let up: Vec<_> = InstanceState::ALL.into_iter().filter(InstanceState::is_up).collect();
        assert_eq!(up, [Pending, Running]);
        let ending: Vec<_> = InstanceState::ALL.into_iter().filter(InstanceState::is_ending).collect();
        assert_eq!(ending, [ShuttingDown, Terminated, Gone]);
        let down: Vec<_> = InstanceState::ALL.into_iter().filter(InstanceState::is_down).collect();
        assert_eq!(down, [Stopped, ShuttingDown, Terminated, Gone]);
    }
}
