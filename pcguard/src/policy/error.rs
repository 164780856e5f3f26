//! Why a policy cannot be compiled: it does not fit the kernel tables.

use std::fmt;

/// The policy does not fit the kernel tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyError {
    TooManyRules { count: usize, max: usize },
    TooManyClasses { count: usize, max: usize },
    TooManySlots { max: usize },
    TooManyPortLabels { protocol: &'static str, count: usize, max: usize },
    TooManyPrefixes { family: &'static str, count: usize, max: usize },
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyError::TooManyRules { count, max } => {
                write!(f, "too many rules: {count} (at most {max}); disable features or merge site rules")
            }
            PolicyError::TooManyClasses { count, max } => {
                write!(f, "too many peer classes with addresses: {count} (at most {max} besides `any`)")
            }
            PolicyError::TooManySlots { max } => {
                write!(f, "too many distinct port/peer combinations (at most {max} slots); merge site rules or ports")
            }
            PolicyError::TooManyPortLabels { protocol, count, max } => write!(
                f,
                "too many distinct {protocol} ports and ranges: {count} (at most {max}); use ranges in site rules"
            ),
            PolicyError::TooManyPrefixes { family, count, max } => {
                write!(f, "too many {family} prefixes in [peers]: {count} (at most {max})")
            }
        }
    }
}

impl std::error::Error for PolicyError {}
