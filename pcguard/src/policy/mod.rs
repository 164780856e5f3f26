//! placeholder: being written
pub mod compiled;
pub use compiled::*;
