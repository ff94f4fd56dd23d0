//! `ws-proxy-client`: a peer of the proxy, as the manager (`connect`) or the home gateway
//! (`gateway`); the roles are in [`ws_proxy::cli::client`].

use std::process::ExitCode;

use clap::Parser as _;
use common::cli::Flavor;
use ws_proxy::cli::client::Cli;

fn main() -> ExitCode {
    let cli = common::cli::parse(Cli::try_parse);
    common::cli::run("ws-proxy-client", Flavor::Workers(2), || {
        ws_proxy::cli::client::run(cli)
    })
}
