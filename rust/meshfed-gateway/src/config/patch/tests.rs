//! Patch tests.
