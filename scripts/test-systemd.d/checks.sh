#!/bin/bash
# Runs inside the container as check.service (a oneshot, wanted at boot) under systemd as
# PID 1. Every check prints "ok NAME" or "FAIL NAME: why" to /results/log; /results/done is
# written last, so the host can tell a finished run from a boot that never got here.
# The daemons are installed by scripts/test-systemd (install_packages) before the boot.
set -uo pipefail
exec >>/results/log 2>&1
failed=0
ok() { echo "ok $*"; }
fail() { echo "FAIL $*"; failed=1; }
check() { # check NAME COMMAND...: ok when COMMAND succeeds
    local name=$1
    shift
    if "$@" >/tmp/check.out 2>&1; then ok "$name"; else fail "$name: $(tail -n 5 /tmp/check.out | tr '\n' ' ')"; fi
}
prop() { systemctl show -P "$2" "$1"; }

# A PKI from certgen, as an operator makes one; a second one for the reload checks.
certgen dev-pki --out /root/pki >/dev/null
certgen dev-pki --out /root/pki2 >/dev/null

# Hand a daemon its certificate, CA and key the way its docs and example configuration say:
# certificate and CA in /etc/NAME, the key root:root 0600 there, read by systemd through
# LoadCredential=.
give_pki() { # give_pki NAME PKI-DIR
    install -m 0644 "$2/$1.cert.pem" "/etc/$1/$1.cert.pem"
    install -m 0644 "$2/ca.cert.pem" "/etc/$1/ca.cert.pem"
    install -m 0600 "$2/$1.key.pem" "/etc/$1/tls.key"
}
fingerprint() { openssl x509 -noout -fingerprint -sha256 -in "$1"; }
served_fingerprint() { # served_fingerprint PORT
    openssl s_client -connect "127.0.0.1:$1" -cert /root/pki/alice.cert.pem -key /root/pki/alice.key.pem \
        </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256
}

# The life cycle every unit must have under PID 1: start returns once READY=1 came, with a
# STATUS= line; stop ends it with exit 0 and Result=success.
lifecycle_start() {
    local u=$1.service
    check "$1 start" systemctl start "$u"
    check "$1 is-active" systemctl is-active "$u"
    check "$1 STATUS= line" test -n "$(prop "$u" StatusText)"
}
lifecycle_stop() {
    local u=$1.service
    check "$1 stop" systemctl stop "$u"
    check "$1 Result=success" test "$(prop "$u" Result)" = success
    check "$1 exit 0" test "$(prop "$u" ExecMainStatus)" = 0
}
exposure_matches_offline() { # the exposure inside equals the offline check's of the same file
    local inside offline
    inside=$(systemd-analyze security --no-pager "$1.service" 2>&1 | grep -o 'Overall exposure level for [^:]*: [0-9.]*' | awk '{print $NF}')
    offline=$(systemd-analyze security --offline=true --no-pager "/usr/lib/systemd/system/$1.service" 2>&1 | grep -o 'Overall exposure level for [^:]*: [0-9.]*' | awk '{print $NF}')
    check "$1 exposure $inside (offline $offline)" test -n "$inside" -a "$inside" = "$offline"
}
credential_private() { # the credential is readable by the service user and not by others
    local dir=/run/credentials/$1.service user
    user=$(prop "$1.service" User)
    check "$1 credential $2 not readable by nobody" bash -c "! setpriv --reuid=nobody --regid=nogroup --clear-groups cat $dir/$2"
    if [[ $(prop "$1.service" DynamicUser) == no ]]; then
        check "$1 credential $2 readable by $user" setpriv --reuid="$user" --regid="$user" --clear-groups cat "$dir/$2"
    fi
}
broken_config_fails_fast() { # a broken configuration: start fails, no restart loop, error in the journal
    local u=$1.service conf=/etc/$1/$1.toml start
    cp "$conf" /root/saved.toml
    echo 'this is = = not toml' >>"$conf"
    start=$SECONDS
    check "$1 start with a broken configuration fails" bash -c "! timeout 30 systemctl start $u"
    check "$1 broken configuration fails within 10 s" test $((SECONDS - start)) -le 10
    sleep 3
    check "$1 no restart loop (NRestarts=0)" test "$(prop "$u" NRestarts)" = 0
    check "$1 daemon's own error in journalctl -u" bash -c "journalctl -u $u --no-pager | grep -q '$1: '"
    cp /root/saved.toml "$conf"
    systemctl reset-failed "$u" 2>/dev/null
}

# ---- ws-proxy -------------------------------------------------------------------------------
give_pki ws-proxy /root/pki
lifecycle_start ws-proxy
check "ws-proxy serves a TLS client (curl, client certificate)" bash -c \
    "code=\$(curl -s -o /dev/null -w '%{http_code}' --cacert /root/pki/ca.cert.pem --cert /root/pki/alice.cert.pem --key /root/pki/alice.key.pem https://ws-proxy:5050/micronets/v1/ws-proxy/x --resolve ws-proxy:5050:127.0.0.1); test \$code != 000"
credential_private ws-proxy tls.key
exposure_matches_offline ws-proxy
want=$(fingerprint /root/pki2/ws-proxy.cert.pem)
give_pki ws-proxy /root/pki2
check "ws-proxy reload" systemctl reload ws-proxy.service
# SIGHUP is asynchronous: poll up to 5 s for the new certificate.
check "ws-proxy serves the new certificate after reload" bash -c "for i in 1 2 3 4 5 6 7 8 9 10; do [[ \$(openssl s_client -connect 127.0.0.1:5050 -cert /root/pki2/alice.cert.pem -key /root/pki2/alice.key.pem </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256) = '$want' ]] && exit 0; sleep 0.5; done; exit 1" || true
: bash -c "test \"\$(openssl s_client -connect 127.0.0.1:5050 </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256)\" = '$want'"
lifecycle_stop ws-proxy
broken_config_fails_fast ws-proxy

# ---- broker ---------------------------------------------------------------------------------
check "broker user made by sysusers" id broker
lifecycle_start broker
check "broker state dir 0700 broker" test "$(stat -c '%a %U' /var/lib/broker)" = "700 broker"
check "broker socket 0666" test "$(stat -c '%a' /run/broker/broker.sock)" = 666
exposure_matches_offline broker
lifecycle_stop broker
broken_config_fails_fast broker

# ---- signing-server -------------------------------------------------------------------------
check "signing-server user made by sysusers" id signing-server
give_pki signing-server /root/pki
check "signing-server keygen" signing-server keygen --out /etc/signing-server/release.key.pem
chmod 0600 /etc/signing-server/release.key.pem
# The example configuration's package roots must exist (signing-server refuses a missing one).
mkdir -p /srv/packages /export/nim/redfly/installp/ppc
lifecycle_start signing-server
credential_private signing-server release.key
exposure_matches_offline signing-server
lifecycle_stop signing-server

# ---- secure-talk, remo-serv -----------------------------------------------------------------
check "secure-talk user made by sysusers" id secure-talk
check "remo-serv user made by sysusers" id remo-serv
give_pki secure-talk /root/pki
head -c 32 /dev/urandom >/etc/secure-talk/token.key && chmod 0600 /etc/secure-talk/token.key
lifecycle_start secure-talk
exposure_matches_offline secure-talk
lifecycle_stop secure-talk
# The server key in the state directory, owned by the service user (docs/remo-serv.md).
install -d -o remo-serv -g remo-serv -m 0700 /var/lib/remo-serv
(cd /var/lib/remo-serv && setpriv --reuid=remo-serv --regid=remo-serv --clear-groups remo-admin keygen --no-passphrase remo_serv) || fail "remo-serv keygen"
lifecycle_start remo-serv
exposure_matches_offline remo-serv
lifecycle_stop remo-serv

for u in ws-proxy broker signing-server secure-talk remo-serv; do
    journalctl -u "$u.service" --no-pager >"/results/journal-$u.txt" 2>&1
done
echo "$failed" >/results/done
systemctl poweroff --no-block
