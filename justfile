# Recipes for the suite; each is a thin wrapper over scripts/ or cargo.

# fmt check, module cycles, clippy, all tests, unit exposure, promtool, packages under a real systemd
test:
    scripts/test

# build, make a dev PKI, run everything on loopback (`just demo --keep` to leave it running)
demo *ARGS:
    scripts/demo {{ARGS}}

# benchmarks of the daemons that have them
bench *ARGS:
    scripts/bench {{ARGS}}

# fuzz the network parsers, one target after another (`just fuzz ipc 600`: one, 10 min)
fuzz *ARGS:
    scripts/fuzz {{ARGS}}

# development PKI in certs/dev (`just pki --force-overwrite` to regenerate)
pki *ARGS:
    scripts/dev-pki {{ARGS}}

# boot systemd in a throwaway Debian root and check every packaged unit under PID 1
test-systemd *ARGS:
    scripts/test-systemd {{ARGS}}

# the six Debian packages into target/debian/ (`just package ws-proxy`: one)
package *ARGS:
    scripts/package {{ARGS}}

# score every unit with systemd-analyze security, dry-run the sysusers files
units:
    scripts/check-units

# promtool on deploy/prometheus/ (scrape configuration, alert rules and their tests)
prometheus:
    scripts/check-prometheus

fmt:
    cargo fmt --all

lint:
    cargo clippy --workspace --all-targets --locked -- -D warnings

# fail if a crate's module graph has a cycle (`just modules --crate common` for one crate)
modules *ARGS:
    scripts/check-modules {{ARGS}}
