//! certgen's command line and the lifetimes it parses, as a library so that crates/docgen
//! renders the man page and completions from the definition the binary parses with.

pub mod cli;
pub mod lifetime;
