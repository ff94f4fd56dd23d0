//! ws-proxy integration tests
