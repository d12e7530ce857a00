//! What the tors and Arti are told: each relay's torrc, the torrc of a tor
//! that only uses the network, and Arti's network file.

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context as _;
use arti_client::config::{CfgPath, TorClientConfigBuilder};
use arti_client::TorClientConfig;

use super::{Relay, RelayKind};

/// Arti's TOML configuration for a network of `relays`.
pub(super) fn network_toml(relays: &[Relay]) -> String {
    let authorities: Vec<&Relay> = relays
        .iter()
        .filter(|relay| relay.kind == RelayKind::Authority)
        .collect();
    let quoted = |items: Vec<String>| -> String {
        let items: Vec<String> = items.into_iter().map(|s| format!("\"{s}\"")).collect();
        items.join(", ")
    };
    let dir_ports = || -> String {
        let lists: Vec<String> = authorities
            .iter()
            .map(|auth| format!("[\"{}\"]", auth.dir_addr()))
            .collect();
        lists.join(", ")
    };

    let mut out = String::from(
        "# Arti configuration for a private Tor network on 127.0.0.1, made by\n\
         # shroud-tests' tornet module. Load it as Arti's own TOML configuration\n\
         # (a TorClientConfigBuilder), then set storage.cache_dir and state_dir.\n\n",
    );
    let v3idents = authorities
        .iter()
        .filter_map(|auth| auth.v3ident.clone())
        .collect();
    let _ = writeln!(out, "[tor_network.authorities]");
    let _ = writeln!(out, "v3idents = [{}]", quoted(v3idents));
    for field in ["uploads", "downloads", "votes"] {
        let _ = writeln!(out, "{field} = [{}]", dir_ports());
    }
    for auth in &authorities {
        let _ = write!(
            out,
            "\n[[tor_network.fallback_caches]]\n\
             rsa_identity = \"{}\"\n\
             ed_identity = \"{}\"\n\
             orports = [\"{}\"]\n",
            auth.fingerprint,
            auth.ed_identity,
            auth.or_addr()
        );
    }
    out.push_str(
        "\n# Every relay is on 127.0.0.1: without these, all count as one family.\n\
         [path_rules]\n\
         ipv4_subnet_family_prefix = 33\n\
         ipv6_subnet_family_prefix = 129\n\
         \n\
         [address_filter]\n\
         allow_local_addrs = true\n\
         \n\
         # TestingTorNetwork makes an onion service's time period 24 voting\n\
         # intervals long (24 x 20 s = 8 minutes) where the public network's is a\n\
         # day: Arti must compute the same periods, or it looks for descriptors at\n\
         # the wrong HSDirs and finds none.\n\
         [override_net_params]\n\
         hsdir_interval = 8\n",
    );
    out
}

/// Reads an Arti network file as Arti's own configuration and gives it
/// fresh storage under `state_root`.
pub(super) fn load_arti_config(
    network_file: &Path,
    state_root: &Path,
) -> anyhow::Result<TorClientConfig> {
    let text = fs::read_to_string(network_file)
        .with_context(|| format!("reading {}", network_file.display()))?;
    let mut builder: TorClientConfigBuilder = toml::from_str(&text)
        .with_context(|| format!("parsing {} as Arti config", network_file.display()))?;
    builder
        .storage()
        .cache_dir(CfgPath::new_literal(state_root.join("cache")))
        .state_dir(CfgPath::new_literal(state_root.join("state")));
    builder
        .build()
        .with_context(|| format!("building an Arti config from {}", network_file.display()))
}

/// The name of an authority's bandwidth file in its data directory.
pub(super) const BANDWIDTHS: &str = "bandwidths";

/// The bandwidth file (bandwidth-file-spec, version 1.0.0) every authority votes from: the
/// same measured bandwidth for every relay of `all`, as of `now` (seconds since the epoch).
///
/// Without it every relay is unmeasured, and its weight is what it has observed itself: on a
/// young network, 0 to 55 KB/s, the most for the authorities and the few relays that carried
/// the first circuits, and changing from one consensus to the next. Middles, vanguards and
/// introduction points, all picked by weight, then crowd onto those few: one onion service in
/// 20 had two introduction points off the authorities, killing two relays could take every
/// vanguard of a service with them, and an Arti client that took its vanguards from a
/// consensus where most relays weighed nothing could build no onion circuit for minutes.
/// With the file, from the first consensus on, every relay weighs 1000 but the authorities,
/// which tor leaves unmeasured (`Bandwidth=0 Unmeasured=1`) and so weigh nothing: no circuit
/// goes through them but to fetch the directory, and killing relays never stops the
/// consensus.
pub(super) fn bandwidth_file(all: &[Relay], now: u64) -> String {
    let mut file = format!("{now}\n");
    for relay in all {
        let _ = writeln!(file, "node_id=${} bw=1000", relay.fingerprint);
    }
    file
}

/// The torrc of `relay` in a network of `all`, owned by process `owner`; an exit resolves
/// names with the nameserver `resolv_conf` names.
pub(super) fn torrc(relay: &Relay, all: &[Relay], owner: u32, resolv_conf: &Path) -> String {
    // Only non-exits are voted Guard, as exits, being scarce, seldom are on the real network.
    // That keeps each exit in the one position: killing the exit of one tunnel's circuit
    // then touches no other circuit.
    let guards = all
        .iter()
        .filter(|r| r.kind != RelayKind::Exit)
        .map(|r| r.nick.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let mut rc = format!("Nickname {}\n", relay.nick);
    rc.push_str(&common_torrc(&relay.data_dir, all, owner, &guards));
    // Onion-service events at info level, a few lines each: which relays serve as an
    // onion service's introduction points (see Relay::rend_log).
    let _ = writeln!(
        rc,
        "Log [rend]info file {}",
        relay.data_dir.join("rend.log").display()
    );
    let _ = write!(
        rc,
        "SocksPort 0\n\
         ORPort 127.0.0.1:{or_port}\n\
         DirPort 127.0.0.1:{dir_port}\n\
         Address 127.0.0.1\n\
         AssumeReachable 1\n\
         ServerDNSDetectHijacking 0\n\
         ServerDNSTestAddresses\n",
        or_port = relay.or_port,
        dir_port = relay.dir_port,
    );
    if relay.kind == RelayKind::Authority {
        let _ = writeln!(
            rc,
            "V3BandwidthsFile {}",
            relay.data_dir.join(BANDWIDTHS).display()
        );
    }
    match relay.kind {
        // Every relay voted Stable, as most are on the real network: otherwise only the
        // relays up longest (the authorities, which start first) have it, and an onion
        // service's introduction points, which must be Stable, all land on them.
        RelayKind::Authority => rc.push_str(
            "ExitPolicy reject *:*\n\
             AuthDirVoteStableGuaranteeMinUptime 0\n\
             AuthoritativeDirectory 1\n\
             V3AuthoritativeDirectory 1\n\
             V3AuthVotingInterval 20\n\
             V3AuthVoteDelay 4\n\
             V3AuthDistDelay 4\n\
             TestingV3AuthInitialVotingInterval 20\n\
             TestingV3AuthInitialVoteDelay 4\n\
             TestingV3AuthInitialDistDelay 4\n\
             TestingV3AuthVotingStartOffset 0\n",
        ),
        RelayKind::Middle => rc.push_str("ExitPolicy reject *:*\n"),
        // A policy accepting only private addresses looks reject-all to
        // clients (summaries ignore private ranges), hence `accept *:*`.
        RelayKind::Exit => {
            let _ = writeln!(rc, "ServerDNSResolvConfFile {}", resolv_conf.display());
            rc.push_str(
                "ExitRelay 1\n\
             RefuseUnknownExits 0\n\
             ExitPolicyRejectPrivate 0\n\
             ExitPolicyRejectLocalInterfaces 0\n\
             ExitPolicy accept 127.0.0.0/8:*\n\
             ExitPolicy accept *:*\n",
            );
        }
    }
    rc
}

/// The torrc of a tor that uses a network of `all` relays without relaying:
/// the relays' DirAuthority lines and testing options, no ORPort or DirPort.
pub(super) fn user_torrc(
    data_dir: &Path,
    socks: Option<SocketAddr>,
    all: &[Relay],
    owner: u32,
    extra: &str,
) -> String {
    let mut rc = common_torrc(data_dir, all, owner, "*");
    rc.push_str("ClientOnly 1\n");
    match socks {
        Some(addr) => {
            let _ = writeln!(rc, "SocksPort {addr} ExtendedErrors");
        }
        None => rc.push_str("SocksPort 0\n"),
    }
    rc.push_str(extra);
    rc
}

/// What every tor of a network of `all` is told, relay or not: where its
/// files are (`torrc`, `tor.pid`, `notice.log` in `data_dir`), to run as a
/// daemon watching process `owner`, the testing network's options with
/// `guards` voted Guard, and every authority.
fn common_torrc(data_dir: &Path, all: &[Relay], owner: u32, guards: &str) -> String {
    let dir = data_dir.display();
    let mut rc = format!(
        "DataDirectory {dir}\n\
         RunAsDaemon 1\n\
         PidFile {dir}/tor.pid\n\
         Log notice file {dir}/notice.log\n\
         SafeLogging 0\n\
         __OwningControllerProcess {owner}\n\
         TestingTorNetwork 1\n\
         PathsNeededToBuildCircuits 0.67\n\
         TestingDirAuthVoteExit *\n\
         TestingDirAuthVoteHSDir *\n\
         TestingDirAuthVoteGuard {guards}\n\
         TestingMinExitFlagThreshold 0\n\
         V3AuthNIntervalsValid 2\n"
    );
    for auth in all.iter().filter(|r| r.kind == RelayKind::Authority) {
        let _ = writeln!(
            rc,
            "DirAuthority {} orport={} no-v2 v3ident={} 127.0.0.1:{} {}",
            auth.nick,
            auth.or_port,
            auth.v3ident.as_deref().unwrap_or_default(),
            auth.dir_port,
            auth.fingerprint
        );
    }
    rc
}
