//! `shroud-discovery`: see the library crate.

fn main() {}
