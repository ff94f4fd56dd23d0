//! remo-serv integration tests (filled in below).
