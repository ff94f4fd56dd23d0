#!/bin/bash
# Runs inside the container as check.service (a oneshot, wanted at boot) under systemd as
# PID 1, after scripts/test-systemd installed the six packages with dpkg -i. Every check
# prints one line to /results/log, "ok NAME" or "FAIL NAME: why"; /results/done (the number
# of failures) is written last, so the host can tell a finished run from a boot that never
# got here. The container has only its own loopback (--private-network).
set -uo pipefail
exec >>/results/log 2>&1
passed=0
failed=0
ok() {
    echo "ok $*"
    passed=$((passed + 1))
}
fail() {
    echo "FAIL $*"
    failed=$((failed + 1))
}
check() { # check NAME COMMAND...: ok when COMMAND succeeds
    local name=$1
    shift
    if "$@" >/tmp/check.out 2>&1; then ok "$name"; else fail "$name: $(tail -n 5 /tmp/check.out | tr '\n' ' ')"; fi
}
check_eq() { # check_eq NAME WANT GOT
    if [[ $2 == "$3" ]]; then ok "$1"; else fail "$1: want '$2', got '$3'"; fi
}
prop() { systemctl show -P "$2" "$1"; }
mode_owner() { stat -c '%a %U:%G' "$1" 2>&1; }
as() { # as USER COMMAND...: run as USER with only its own group
    local user=$1
    shift
    setpriv --reuid="$user" --regid="$(id -gn "$user")" --init-groups "$@"
}

# ---- a PKI from certgen, as an operator makes one ---------------------------------------
pki=/root/pki
certgen dev-pki --out $pki >/dev/null
renew() { # renew NAME: a renewed server certificate for NAME with a NEW key, same CA
    certgen leaf --cert-basename "$pki/$1-renewed" --server --san localhost --san 127.0.0.1 --san "$1" \
        --ca-certfile $pki/ca.cert.pem --ca-keyfile $pki/ca.key.pem >/dev/null
}
fingerprint() { openssl x509 -noout -fingerprint -sha256 -in "$1"; }
served_fingerprint() { # served_fingerprint PORT: the certificate the daemon serves now
    openssl s_client -connect "127.0.0.1:$1" -cert $pki/alice.cert.pem -key $pki/alice.key.pem \
        </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256 2>/dev/null
}
# Hand a daemon its TLS material the way its page says: certificate and CA 0644 in /etc/NAME,
# the key NAME:root 0600 (read from disk, so a reload takes a new key; not LoadCredential=).
give_tls() { # give_tls NAME CERT KEY CERT-PATH KEY-PATH CA-PATH
    install -m 0644 "$2" "$4"
    install -o "$1" -g root -m 0600 "$3" "$5"
    install -m 0644 $pki/ca.cert.pem "$6"
}

# ---- the checks every daemon gets -------------------------------------------------------
installed_by_package() { # the package made the user (sysusers) and installed the unit
    check "$1 package installed" dpkg -s "$1"
    check "$1 user made by sysusers" id "$1"
    check "$1 unit from the package" test -e "/usr/lib/systemd/system/$1.service"
    check "$1 not started by the install" bash -c "! systemctl is-active -q $1.service"
}
lifecycle_start() { # start returns once READY=1 came, with a STATUS= line
    local u=$1.service
    check "$1 start" systemctl start "$u"
    check "$1 is-active" systemctl is-active "$u"
    check "$1 STATUS= line" test -n "$(prop "$u" StatusText)"
}
lifecycle_stop() { # stop ends it with exit 0 and Result=success
    local u=$1.service
    check "$1 stop" systemctl stop "$u"
    check_eq "$1 Result=success" success "$(prop "$u" Result)"
    check_eq "$1 exit 0" 0 "$(prop "$u" ExecMainStatus)"
}
exposure_matches_offline() { # the exposure inside equals the offline check's of the same file
    local inside offline
    inside=$(systemd-analyze security --no-pager "$1.service" 2>&1 | grep -o 'Overall exposure level for [^:]*: [0-9.]*' | awk '{print $NF}')
    offline=$(systemd-analyze security --offline=true --no-pager "/usr/lib/systemd/system/$1.service" 2>&1 | grep -o 'Overall exposure level for [^:]*: [0-9.]*' | awk '{print $NF}')
    check "$1 exposure $inside (offline $offline)" test -n "$inside" -a "$inside" = "$offline"
}
reload_takes_new_key() { # reload_takes_new_key NAME PORT CERT-PATH KEY-PATH: renewal with a new key
    local before want
    renew "$1"
    before=$(served_fingerprint "$2")
    want=$(fingerprint "$pki/$1-renewed.cert.pem")
    check "$1 serves its certificate before the renewal" test -n "$before" -a "$before" != "$want"
    install -m 0644 "$pki/$1-renewed.cert.pem" "$3"
    install -o "$1" -g root -m 0600 "$pki/$1-renewed.key.pem" "$4"
    check "$1 reload" systemctl reload "$1.service"
    # SIGHUP is asynchronous: poll up to 5 s for the renewed certificate.
    local got= i
    for i in $(seq 20); do
        got=$(served_fingerprint "$2")
        [[ $got != "$want" ]] || break
        sleep 0.25
    done
    check_eq "$1 serves the renewed certificate (new key) after reload" "$want" "$got"
    check "$1 still active after reload" systemctl is-active "$1.service"
    # The TLS key is the service user's alone; a key its group may read is warned about.
    local warning="TLS private key can be read by its group or by others"
    check_eq "$1 TLS key mode" "600 $1:root" "$(mode_owner "$4")"
    check "$1 no key-mode warning for an owner-only key" bash -c "! journalctl -u $1.service --no-pager | grep -q '$warning'"
    chmod 0640 "$4"
    systemctl reload "$1.service"
    check "$1 warns about a TLS key its group may read" eventually journalctl_has "$1" "$warning"
    chmod 0600 "$4"
}
journalctl_has() { journalctl -u "$1.service" --no-pager | grep -q "$2"; }
eventually() { # eventually COMMAND...: true within 5 s
    local i
    for i in $(seq 20); do
        "$@" && return 0
        sleep 0.25
    done
    return 1
}
credential_private() { # credential_private NAME CRED: readable by the service user, not by nobody
    local file=/run/credentials/$1.service/$2 user
    user=$(prop "$1.service" User)
    check "$1 credential $2 readable by $user" as "$user" cat "$file"
    check "$1 credential $2 not readable by nobody" bash -c "! setpriv --reuid=nobody --regid=nogroup --clear-groups cat $file"
}
broken_config_fails_fast() { # a broken configuration: start fails fast, own error, no restart loop
    local u=$1.service conf=/etc/$1/$1.toml start
    cp "$conf" /root/saved.toml
    echo 'this is = = not toml' >>"$conf"
    systemctl reset-failed "$u" 2>/dev/null
    start=$SECONDS
    check "$1 start with a broken configuration fails" bash -c "! timeout 30 systemctl start $u"
    check "$1 broken configuration fails within 10 s" test $((SECONDS - start)) -le 10
    sleep 3
    check_eq "$1 no restart loop (NRestarts)" 0 "$(prop "$u" NRestarts)"
    check "$1 inactive after the broken start" bash -c "! systemctl is-active -q $u"
    check "$1 daemon's own error in journalctl -u" bash -c "journalctl -u $u --no-pager | grep -q '$1: '"
    cp /root/saved.toml "$conf"
    systemctl reset-failed "$u" 2>/dev/null
}

metrics_on() { # metrics_on NAME KEY PORT: turn on the metrics listener (off in the example)
    sed -i "1i $2 = \"127.0.0.1:$3\"" "/etc/$1/$1.toml"
}
metrics_scraped() { # metrics_scraped NAME PORT PREFIX: /metrics answers inside the unit's sandbox
    local body accepted
    body=$(curl -sf --max-time 5 "http://127.0.0.1:$2/metrics")
    check "$1 /metrics has the process metrics" grep -q '^process_resident_memory_bytes [1-9]' <<<"$body"
    check "$1 /metrics has open fds" grep -q '^process_open_fds [1-9]' <<<"$body"
    accepted=$(grep "^$3_connections_accepted_total" <<<"$body" | awk '{n += $NF} END {print n + 0}')
    check "$1 /metrics counted the round trip's connections ($accepted)" test "$accepted" -gt 0
}

# ---- ws-proxy: a curl through two paired peers to a local HTTP service -------------------
# (docs/ws-proxy.md, "Walkthrough: curl through the relay")
installed_by_package ws-proxy
give_tls ws-proxy $pki/ws-proxy.cert.pem $pki/ws-proxy.key.pem \
    /etc/ws-proxy/ws-proxy.cert.pem /etc/ws-proxy/tls.key /etc/ws-proxy/ca.cert.pem
sed -i '1i status_listen = "unix:/run/ws-proxy/status.sock"' /etc/ws-proxy/ws-proxy.toml
metrics_on ws-proxy metrics_listen 9101
lifecycle_start ws-proxy
check_eq "ws-proxy /run/ws-proxy mode" "750 ws-proxy:ws-proxy" "$(mode_owner /run/ws-proxy)"
check_eq "ws-proxy status socket mode" "660 ws-proxy:ws-proxy" "$(mode_owner /run/ws-proxy/status.sock)"
mkdir -p /srv/www && echo "hello through the relay" >/srv/www/hello.txt
# (8081: remo-serv's 8080 is taken later; the httpd ends with the ws-proxy checks)
busybox httpd -f -p 127.0.0.1:8081 -h /srv/www &
httpd=$!
url=wss://127.0.0.1:5050/micronets/v1/ws-proxy/gw-test/1
ws-proxy-client gateway $url --cert $pki/bob.pkeycert.pem --ca $pki/ca.cert.pem \
    --upstream http://127.0.0.1:8081 >/tmp/gateway.log 2>&1 &
gateway=$!
ws-proxy-client connect $url --cert $pki/alice.pkeycert.pem --ca $pki/ca.cert.pem \
    --http-listen 127.0.0.1:5001 >/tmp/connect.log 2>&1 &
connect=$!
through_relay() { # the front end answers 503 until the peers are paired
    local i out
    for i in $(seq 40); do
        out=$(curl -s --max-time 5 http://127.0.0.1:5001/hello.txt) && [[ $out == "hello through the relay" ]] && return 0
        sleep 0.25
    done
    echo "last answer: $out; gateway: $(tail -n 2 /tmp/gateway.log); connect: $(tail -n 2 /tmp/connect.log)"
    return 1
}
check "ws-proxy curl through two paired peers to a local HTTP service" through_relay
check "ws-proxy status shows the pair" bash -c \
    "curl -s --unix-socket /run/ws-proxy/status.sock http://localhost/status | grep -q paired"
metrics_scraped ws-proxy 9101 ws_proxy
reload_takes_new_key ws-proxy 5050 /etc/ws-proxy/ws-proxy.cert.pem /etc/ws-proxy/tls.key
kill $gateway $connect $httpd 2>/dev/null
wait $gateway $connect $httpd 2>/dev/null
exposure_matches_offline ws-proxy
lifecycle_stop ws-proxy
broken_config_fails_fast ws-proxy

# ---- broker: save as one user, load and verify refused for another ------------------------
# (docs/broker.md, "Quick start" and "broker-cli"; the HTTPS API for the reload check)
installed_by_package broker
useradd -m alice
useradd -m bob
give_tls broker $pki/broker.cert.pem $pki/broker.key.pem /etc/broker/https.crt /etc/broker/https.key /etc/broker/clients-ca.crt
cat >>/etc/broker/broker.toml <<'TOML'
[https]
listen = "127.0.0.1:7443"
[https.tls]
cert = "/etc/broker/https.crt"
key = "/etc/broker/https.key"
client_ca = "/etc/broker/clients-ca.crt"
[https.users]
"CN=alice" = "alice"
TOML
metrics_on broker metrics_listen 9105
lifecycle_start broker
check_eq "broker state dir mode" "700 broker:broker" "$(mode_owner /var/lib/broker)"
check_eq "broker database mode" "600 broker:broker" "$(mode_owner /var/lib/broker/broker.db)"
check_eq "broker CA key mode" "600 broker:broker" "$(mode_owner /var/lib/broker/ca.key)"
check_eq "broker /run/broker mode" "755 broker:broker" "$(mode_owner /run/broker)"
check_eq "broker socket mode" "666 broker:broker" "$(mode_owner /run/broker/broker.sock)"
check_eq "broker whoami as alice" alice "$(cd /tmp && as alice broker-cli --json whoami | grep -o '"user":"[a-z]*"' | cut -d'"' -f4)"
job=$(cd /tmp && as alice broker-cli --json save ssh | grep -o '"id":"job_[0-9a-f]*"' | cut -d'"' -f4)
check "broker save as alice" test -n "$job"
check "broker load as alice" bash -c "cd /tmp && setpriv --reuid=alice --regid=alice --init-groups broker-cli --json load $job | grep -o '\"secret\":\"[0-9a-f]*\"' | cut -d'\"' -f4 >/tmp/secret && test -s /tmp/secret"
check "broker verify as alice (the secret from load)" bash -c "cd /tmp && setpriv --reuid=alice --regid=alice --init-groups broker-cli verify $job </tmp/secret"
check "broker load as bob refused (65, not his job)" bash -c "cd /tmp && setpriv --reuid=bob --regid=bob --init-groups broker-cli load $job; test \$? = 65"
check "broker verify as bob refused (65, not his job)" bash -c "cd /tmp && setpriv --reuid=bob --regid=bob --init-groups broker-cli verify $job </tmp/secret; test \$? = 65"
check "broker HTTPS whoami as alice's certificate" bash -c \
    "curl -s --cacert $pki/ca.cert.pem --cert $pki/alice.cert.pem --key $pki/alice.key.pem https://127.0.0.1:7443/v1/whoami | grep -q '\"user\":\"alice\"'"
metrics_scraped broker 9105 broker
reload_takes_new_key broker 7443 /etc/broker/https.crt /etc/broker/https.key
check "broker HTTPS request after reload" bash -c \
    "curl -s --cacert $pki/ca.cert.pem --cert $pki/alice.cert.pem --key $pki/alice.key.pem https://127.0.0.1:7443/v1/whoami | grep -q '\"user\":\"alice\"'"
exposure_matches_offline broker
lifecycle_stop broker
broken_config_fails_fast broker

# ---- signing-server: a signature checked with openssl against the public key ------------
# (docs/signing-server.md, "Quick start" and "Signatures")
installed_by_package signing-server
give_tls signing-server $pki/signing-server.cert.pem $pki/signing-server.key.pem \
    /etc/signing-server/signing-server.cert.pem /etc/signing-server/tls.key /etc/signing-server/ca.cert.pem
check "signing-server keygen" signing-server keygen --out /etc/signing-server/release.key.pem
check_eq "signing-server release key mode" "600 root:root" "$(mode_owner /etc/signing-server/release.key.pem)"
# The example configuration's package roots must exist (signing-server refuses a missing one).
mkdir -p /srv/packages /export/nim/redfly/installp/ppc
metrics_on signing-server metrics_listen 9104
lifecycle_start signing-server
check_eq "signing-server state dir mode" "700 signing-server:signing-server" "$(mode_owner /var/lib/signing-server)"
check_eq "signing-server audit database mode" "600 signing-server:signing-server" "$(mode_owner /var/lib/signing-server/audit.sqlite)"
credential_private signing-server release.key
head -c 100000 /dev/urandom >/root/bos.rte.demo.7.3.0.0.bff
tls="--host 127.0.0.1 --ca $pki/ca.cert.pem --cert $pki/alice.cert.pem --key $pki/alice.key.pem"
signature=$(signing-client $tls --upload /root/bos.rte.demo.7.3.0.0.bff --json 2>/tmp/sign.err | grep -o '"signature":"[^"]*"' | cut -d'"' -f4)
check "signing-server signs an upload (signing-client)" test -n "$signature"
echo "$signature" | base64 -d >/root/sig.bin 2>/dev/null
check "signing-server signature verified by openssl against the public key" \
    openssl pkeyutl -verify -rawin -pubin -inkey /etc/signing-server/release.key.pem.pub \
    -sigfile /root/sig.bin -in /root/bos.rte.demo.7.3.0.0.bff
metrics_scraped signing-server 9104 signing_server
reload_takes_new_key signing-server 6000 /etc/signing-server/signing-server.cert.pem /etc/signing-server/tls.key
check "signing-client keys after reload" bash -c "signing-client keys $tls | grep -q release"
exposure_matches_offline signing-server
lifecycle_stop signing-server
broken_config_fails_fast signing-server

# ---- secure-talk: secure-talk-cli echo ---------------------------------------------------
# (docs/secure-talk.md)
installed_by_package secure-talk
give_tls secure-talk $pki/secure-talk.cert.pem $pki/secure-talk.key.pem \
    /etc/secure-talk/secure-talk.cert.pem /etc/secure-talk/tls.key /etc/secure-talk/ca.cert.pem
check "secure-talk gen-token-key" secure-talk gen-token-key /etc/secure-talk/token.key
check_eq "secure-talk token key mode" "600 root:root" "$(mode_owner /etc/secure-talk/token.key)"
metrics_on secure-talk metrics_listen 9103
lifecycle_start secure-talk
check_eq "secure-talk state dir mode" "700 secure-talk:secure-talk" "$(mode_owner /var/lib/secure-talk)"
check_eq "secure-talk /run/secure-talk mode" "750 secure-talk:secure-talk" "$(mode_owner /run/secure-talk)"
check_eq "secure-talk client socket mode" "660 secure-talk:secure-talk" "$(mode_owner /run/secure-talk/talk.sock)"
check_eq "secure-talk IPC socket mode" "600 secure-talk:secure-talk" "$(mode_owner /var/lib/secure-talk/ipc/ipc.sock)"
check_eq "secure-talk IPC directory mode" "700 secure-talk:secure-talk" "$(mode_owner /var/lib/secure-talk/ipc)"
credential_private secure-talk token.key
st="--host 127.0.0.1 --ca $pki/ca.cert.pem --cert $pki/alice.cert.pem --key $pki/alice.key.pem --token-file /root/st-token"
check "secure-talk-cli echo" bash -c "secure-talk-cli $st echo 'hello secure-talk' | grep -q 'hello secure-talk'"
metrics_scraped secure-talk 9103 secure_talk
reload_takes_new_key secure-talk 8445 /etc/secure-talk/secure-talk.cert.pem /etc/secure-talk/tls.key
check "secure-talk-cli echo after reload" bash -c "secure-talk-cli $st echo again | grep -q again"
exposure_matches_offline secure-talk
lifecycle_stop secure-talk
broken_config_fails_fast secure-talk

# ---- remo-serv: remo login and exec as a user added by remo-admin -------------------------
# (docs/remo-serv.md, "systemd unit": the by-hand key and user steps, HTTPS on)
installed_by_package remo-serv
install -d -o remo-serv -g remo-serv -m 0700 /var/lib/remo-serv /var/lib/remo-serv/files
check "remo-serv server key (remo-admin keygen as remo-serv)" \
    runuser -u remo-serv -- remo-admin keygen remo_serv /var/lib/remo-serv --no-passphrase
mkdir -p /root/remo
check "remo user key (remo-admin keygen)" remo-admin keygen alice /root/remo --no-passphrase
check "remo-admin useradd alice" bash -c \
    "runuser -u remo-serv -- remo-admin useradd --base /var/lib/remo-serv/users_db alice /dev/stdin </root/remo/alice.pem"
give_tls remo-serv $pki/remo-serv.cert.pem $pki/remo-serv.key.pem /etc/remo-serv/server.crt /etc/remo-serv/server.key /root/remo/ca.pem
cat >>/etc/remo-serv/remo-serv.toml <<'TOML'
"tls-cert" = "/etc/remo-serv/server.crt"
"tls-key" = "/etc/remo-serv/server.key"
TOML
metrics_on remo-serv metrics-listen 9102
lifecycle_start remo-serv
check_eq "remo-serv state dir mode" "700 remo-serv:remo-serv" "$(mode_owner /var/lib/remo-serv)"
check_eq "remo-serv server key mode" "600 remo-serv:remo-serv" "$(mode_owner /var/lib/remo-serv/remo_serv_key.pem)"
check_eq "remo-serv user database mode" "600 remo-serv:remo-serv" "$(mode_owner /var/lib/remo-serv/users_db.sqlite)"
remo=(remo -u alice -k /root/remo/alice_key.pem -s /var/lib/remo-serv/remo_serv.pem --ca /root/remo/ca.pem https://127.0.0.1:8080)
check "remo login and exec (HTTPS)" bash -c "${remo[*]} exec -- echo hello remo | grep -q 'hello remo'"
check "remo exec runs as remo-serv" bash -c "test \"\$(${remo[*]} exec -- id -un)\" = remo-serv"
metrics_scraped remo-serv 9102 remo_serv
reload_takes_new_key remo-serv 8080 /etc/remo-serv/server.crt /etc/remo-serv/server.key
check "remo exec after reload" bash -c "${remo[*]} exec -- echo again | grep -q again"
exposure_matches_offline remo-serv
lifecycle_stop remo-serv
broken_config_fails_fast remo-serv

# ---- what the install gives an operator: man pages, completions, systemctl cat --------------
for d in ws-proxy broker signing-server secure-talk remo-serv; do
    # (/lib is /usr/lib on Debian 12, and systemd names the first of its search paths)
    check "$d systemctl cat shows the packaged unit" bash -c \
        "systemctl cat $d.service | grep -Eqx '# (/usr)?/lib/systemd/system/$d.service'"
    check "$d systemctl cat: ExecStart in /usr/bin" bash -c \
        "systemctl cat $d.service | grep -q '^ExecStart=/usr/bin/$d '"
done
completes() { # completes BINARY: bash completion of "BINARY --" offers --help
    bash -c 'source /usr/share/bash-completion/bash_completion
        _completion_loader "$1"
        COMP_WORDS=("$1" --); COMP_CWORD=1; COMP_LINE="$1 --"; COMP_POINT=${#COMP_LINE}
        "$(complete -p "$1" | grep -o -- "-F [^ ]*" | cut -c4-)" "$1" -- "$1"
        printf "%s\n" "${COMPREPLY[@]}"' _ "$1" | grep -x -- --help >/dev/null
    # not grep -q: it exits at the first match, and printf then fails on the closed pipe
    # (pipefail), as it did in CI when --help came early in a long list
}
for b in ws-proxy ws-proxy-client remo-serv remo remo-admin secure-talk secure-talk-cli \
    secure-talk-pipe signing-server signing-client broker broker-cli broker-run certgen; do
    check "man $b" bash -c "man -P cat $b 2>/dev/null | grep -q '^NAME'"
    check "$b <TAB> (bash completion)" completes "$b"
    check "$b zsh and fish completions" test -e "/usr/share/zsh/vendor-completions/_$b" \
        -a -e "/usr/share/fish/vendor_completions.d/$b.fish"
done

# ---- the packages under PID 1: dpkg -r stops a running service, dpkg -P removes /etc -------
for d in ws-proxy broker signing-server secure-talk remo-serv; do
    systemctl start "$d.service" >/dev/null 2>&1
    check "$d running before dpkg -r" systemctl is-active "$d.service"
    check "$d dpkg -r" dpkg -r "$d"
    check "$d stopped by dpkg -r" bash -c "! systemctl is-active -q $d.service"
    check "$d dpkg -r keeps /etc/$d/$d.toml" test -e "/etc/$d/$d.toml"
    check "$d dpkg -P" dpkg -P "$d"
    check "$d dpkg -P removes /etc/$d/$d.toml" test ! -e "/etc/$d/$d.toml"
    [[ $d == ws-proxy ]] || check "$d dpkg -P keeps /var/lib/$d" test -d "/var/lib/$d"
done

echo "test-systemd: $passed passed, $failed failed"
if ((failed)); then
    for u in ws-proxy broker signing-server secure-talk remo-serv; do
        journalctl -u "$u.service" --no-pager >"/results/journal-$u.txt" 2>&1
    done
    journalctl -b --no-pager >/results/journal-all.txt 2>&1
fi
echo "$failed" >/results/done
systemctl poweroff --no-block
