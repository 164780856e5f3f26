//! DNS-aware egress: the documented cloud endpoints are names
//! (`mf.cloud.papercut.com`, `*.papercut.com`, `graph.microsoft.com`, ...).
//!
//! The kernel copies the queries this server sends to its configured
//! resolvers and the one answer it lets through per query (`DNS_MESSAGES`,
//! docs/datapath.md). Here:
//!
//! 1. [`queries`] binds every answer to its outstanding query (resolver,
//!    server port, transaction id, question) and refuses the rest;
//! 2. [`wire`] reads messages strictly (bounded, no guessing);
//! 3. [`learner`] keeps the answered addresses of the policy's FQDNs until
//!    their TTL runs out, within caps, except those [`guard`] forbids
//!    (special, own, resolver and local-class addresses);
//! 4. the daemon writes them to the kernel's `LEARNED` map.
//!
//! What remains possible: an attacker who sees or guesses a query's port,
//! transaction id and question can answer first, but only with addresses
//! the guard allows, for the classes the query's name already has.

pub mod guard;
pub mod learner;
pub mod queries;
pub mod wire;

#[cfg(test)]
mod fuzz;

pub use guard::{Forbidden, Guard};
pub use learner::{
    FqdnClasses, LearnReport, LearnedWrite, Learner, Limits, MAX_LEARNED, MAX_PER_NAME, MAX_TTL, MIN_TTL, Newly,
    Pattern, Refusal, RefusedAddress,
};
pub use queries::{Accepted, Handled, MAX_QUERIES, QUERY_TIMEOUT, QueryTable, Refused, Seen};
pub use wire::{Question, Resolved};
