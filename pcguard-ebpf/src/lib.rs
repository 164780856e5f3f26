#![no_std]
// Library target so the userspace crate can depend on this package for cache invalidation.
