//! remo-serv: placeholder
pub mod keys;
pub mod proto;
pub mod users;
