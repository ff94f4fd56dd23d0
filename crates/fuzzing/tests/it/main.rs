//! The kept fuzz inputs, replayed on stable by the ordinary test suite.

mod replay;
