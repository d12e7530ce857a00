//! The fleet's parsing, selection, expiry and answers.

use super::*;

fn entry(name: &str, region: &str) -> ProxyEntry {
    ProxyEntry {
        name: name.into(),
        port: 443,
        region: region.into(),
        onion: None,
    }
}

fn fleet_of(entries: Vec<ProxyEntry>) -> Fleet {
    let proxy = entries.into_iter().map(StaticProxy::from).collect();
    Fleet::new(FleetFile { proxy }, Duration::from_secs(30))
}

#[test]
fn parses_and_validates_the_fleet_file() {
    let file = FleetFile::parse(
        r#"
        [[proxy]]
        name = "P1.Example.net."
        port = 443
        region = "eu"

        [[proxy]]
        name = "p1.example.net"
        port = 8443
        region = "eu"
        "#,
    )
    .unwrap();
    assert_eq!(file.proxy[0].name, "p1.example.net");
    assert_eq!(file.proxy.len(), 2);
    assert_eq!(FleetFile::parse("").unwrap().proxy, vec![]);

    let dup = "[[proxy]]\nname = \"a.test\"\nport = 1\nregion = \"x\"\n\
               [[proxy]]\nname = \"A.test\"\nport = 1\nregion = \"y\"\n";
    let err = FleetFile::parse(dup).unwrap_err();
    assert!(
        matches!(err, FleetError::Duplicate { port: 1, .. }),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "the fleet file lists a.test:1 twice");

    let bad_name = "[[proxy]]\nname = \"a b\"\nport = 1\nregion = \"x\"\n";
    assert!(matches!(
        FleetFile::parse(bad_name),
        Err(FleetError::Entry {
            number: 1,
            source: EntryError::BadName { .. }
        })
    ));
    let empty_region = "[[proxy]]\nname = \"a.test\"\nport = 1\nregion = \" \"\n";
    assert!(matches!(
        FleetFile::parse(empty_region),
        Err(FleetError::Entry {
            source: EntryError::EmptyRegion { .. },
            ..
        })
    ));
    let zero_port = "[[proxy]]\nname = \"a.test\"\nport = 0\nregion = \"x\"\n";
    assert!(matches!(
        FleetFile::parse(zero_port),
        Err(FleetError::Entry {
            source: EntryError::ZeroPort { .. },
            ..
        })
    ));
    let unknown = "[[proxy]]\nname = \"a.test\"\nport = 1\nregion = \"x\"\nweight = 2\n";
    assert!(matches!(
        FleetFile::parse(unknown),
        Err(FleetError::Parse(_))
    ));
    assert!(matches!(
        FleetFile::parse("[[proxies]]\n"),
        Err(FleetError::Parse(_))
    ));
}

#[test]
fn the_example_fleet_file_parses() {
    let file = FleetFile::parse(include_str!("../../fleet.example.toml")).unwrap();
    assert_eq!(file.proxy.len(), 2);
}

#[test]
fn selection_spreads_across_regions_first() {
    let fleet = fleet_of(vec![
        entry("eu1.test", "eu"),
        entry("eu2.test", "eu"),
        entry("eu3.test", "eu"),
        entry("us1.test", "us"),
        entry("us2.test", "us"),
        entry("ap1.test", "ap"),
    ]);
    let now = Instant::now();
    for i in 0..50 {
        let host = format!("host{i}.example");
        let three = fleet.select(&host, 3, now);
        let regions: HashSet<_> = three.iter().map(|e| e.region.as_str()).collect();
        assert_eq!(regions.len(), 3, "{host}: {three:?}");

        let five = fleet.select(&host, 5, now);
        assert_eq!(
            &five[..3],
            &three[..],
            "a longer list extends a shorter one"
        );
        // The fourth and fifth are second picks from eu and us, never a second ap.
        let later: HashSet<_> = five[3..].iter().map(|e| e.region.as_str()).collect();
        assert_eq!(later, HashSet::from(["eu", "us"]), "{host}: {five:?}");

        let all = fleet.select(&host, 100, now);
        assert_eq!(all.len(), 6);
    }
}

#[test]
fn selection_is_deterministic_and_spreads_hosts() {
    let entries: Vec<_> = (0..10)
        .map(|i| entry(&format!("p{i}.test"), "eu"))
        .collect();
    let fleet = fleet_of(entries.clone());
    let mut reversed = entries;
    reversed.reverse();
    let other_order = fleet_of(reversed);
    let now = Instant::now();

    let mut first_choices = HashSet::new();
    for i in 0..200 {
        let host = format!("h{i}.example");
        let picked = fleet.select(&host, 3, now);
        assert_eq!(picked, fleet.select(&host, 3, now));
        assert_eq!(picked, other_order.select(&host, 3, now));
        first_choices.insert(picked[0].name.clone());
    }
    // 200 hosts over 10 proxies: every proxy is somebody's first choice.
    assert_eq!(first_choices.len(), 10);

    // Pinned values: the hash must not change between builds.
    let picked: Vec<_> = fleet
        .select("example.com", 3, now)
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(picked, PINNED_EXAMPLE_COM);
}

const PINNED_EXAMPLE_COM: [&str; 3] = ["p5.test", "p3.test", "p1.test"];

#[test]
fn removing_a_proxy_moves_only_its_hosts() {
    let entries: Vec<_> = (0..10)
        .map(|i| entry(&format!("p{i}.test"), "eu"))
        .collect();
    let full = fleet_of(entries.clone());
    let without_p3 = fleet_of(
        entries
            .into_iter()
            .filter(|e| e.name != "p3.test")
            .collect(),
    );
    let now = Instant::now();
    for i in 0..200 {
        let host = format!("h{i}.example");
        let before = full.select(&host, 1, now);
        let after = without_p3.select(&host, 1, now);
        if before[0].name != "p3.test" {
            assert_eq!(before, after);
        }
    }
}

#[test]
fn heartbeats_expire_and_leave_removes() {
    let mut fleet = fleet_of(vec![entry("static.test", "eu")]);
    let t0 = Instant::now();
    assert!(fleet
        .heartbeat(entry("Live.Test", "us"), Reach::default(), t0)
        .unwrap());
    assert!(fleet.healthy(t0).contains(&entry("live.test", "us")));
    assert_eq!(fleet.healthy(t0).len(), 2);

    // Still there just before the timeout, refreshed by a heartbeat, gone after.
    let t29 = t0 + Duration::from_secs(29);
    assert_eq!(fleet.healthy(t29).len(), 2);
    assert!(!fleet
        .heartbeat(entry("live.test", "us"), Reach::default(), t29)
        .unwrap());
    let t58 = t0 + Duration::from_secs(58);
    assert_eq!(fleet.healthy(t58).len(), 2);
    let t59 = t0 + Duration::from_secs(59);
    assert_eq!(fleet.healthy(t59), vec![entry("static.test", "eu")]);
    assert_eq!(fleet.select("x.test", 3, t59).len(), 1);
    fleet.prune(t59);
    assert!(fleet.live.is_empty());

    // Leaving removes at once; static entries stay whatever is said.
    fleet
        .heartbeat(entry("live.test", "us"), Reach::default(), t59)
        .unwrap();
    assert!(fleet.leave("LIVE.test", 443));
    assert!(!fleet.leave("live.test", 443));
    assert!(!fleet.leave("static.test", 443));
    assert_eq!(fleet.healthy(t59), vec![entry("static.test", "eu")]);
    assert!(!fleet
        .heartbeat(entry("static.test", "us"), Reach::default(), t59)
        .unwrap());
    assert_eq!(fleet.healthy(t59), vec![entry("static.test", "eu")]);
}

#[test]
fn live_entries_are_bounded() {
    let mut fleet = fleet_of(vec![]).with_max_live(2);
    let now = Instant::now();
    fleet
        .heartbeat(entry("a.test", "eu"), Reach::default(), now)
        .unwrap();
    fleet
        .heartbeat(entry("b.test", "eu"), Reach::default(), now)
        .unwrap();
    assert_eq!(
        fleet.heartbeat(entry("c.test", "eu"), Reach::default(), now),
        Err(HeartbeatError::Full(2))
    );
    // A known entry may still refresh, and expired ones make room.
    fleet
        .heartbeat(entry("a.test", "eu"), Reach::default(), now)
        .unwrap();
    let later = now + Duration::from_secs(31);
    fleet
        .heartbeat(entry("c.test", "eu"), Reach::default(), later)
        .unwrap();
    assert!(matches!(
        fleet.heartbeat(entry("bad name", "eu"), Reach::default(), later),
        Err(HeartbeatError::Entry(EntryError::BadName { .. }))
    ));
}

fn reach(addrs: &[&str], names: &[&str]) -> Reach {
    Reach {
        addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        names: names.iter().map(|n| (*n).to_owned()).collect(),
        peer: None,
    }
}

fn ips(addrs: &[&str]) -> Vec<IpAddr> {
    addrs.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn addresses_are_the_holders_or_else_the_rendezvous_choice() {
    let file = FleetFile::parse(
        "[[proxy]]\nname = \"static.test\"\nport = 443\nregion = \"eu\"\n\
         addrs = [\"192.0.2.1\", \"2001:db8::1\"]\n",
    )
    .unwrap();
    let mut fleet = Fleet::new(file, Duration::from_secs(30));
    let t0 = Instant::now();
    fleet
        .heartbeat(
            entry("a.test", "eu"),
            reach(&["192.0.2.2"], &["Example.TEST"]),
            t0,
        )
        .unwrap();
    fleet
        .heartbeat(
            entry("b.test", "us"),
            reach(&["192.0.2.3"], &["example.test", "x.test"]),
            t0,
        )
        .unwrap();
    fleet
        .heartbeat(entry("c.test", "us"), reach(&["192.0.2.4"], &[]), t0)
        .unwrap();

    // Held by a and b (names are normalised): their addresses, whatever rendezvous says.
    assert_eq!(
        fleet.addresses("example.test", 3, t0),
        ips(&["192.0.2.2", "192.0.2.3"])
    );
    assert_eq!(fleet.addresses("example.test", 1, t0), ips(&["192.0.2.2"]));

    // Held nowhere: the addresses of the proxies a list for it would name.
    let chosen = fleet.select("nowhere.test", 2, t0);
    let expected: Vec<IpAddr> = chosen
        .iter()
        .flat_map(|e| match e.name.as_str() {
            "static.test" => ips(&["192.0.2.1", "2001:db8::1"]),
            "a.test" => ips(&["192.0.2.2"]),
            "b.test" => ips(&["192.0.2.3"]),
            _ => ips(&["192.0.2.4"]),
        })
        .collect();
    assert_eq!(fleet.addresses("nowhere.test", 2, t0), expected);

    // A holder that stops sending heartbeats stops being answered.
    let t31 = t0 + Duration::from_secs(31);
    fleet
        .heartbeat(
            entry("b.test", "us"),
            reach(&["192.0.2.3"], &["example.test"]),
            t0 + Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(fleet.addresses("example.test", 3, t31), ips(&["192.0.2.3"]));
}

#[test]
fn reach_is_bounded() {
    let mut fleet = fleet_of(vec![]);
    let t0 = Instant::now();
    let many: Vec<String> = (0..MAX_NAMES_PER_PROXY + 10)
        .map(|i| format!("n{i}.test"))
        .collect();
    let names: Vec<&str> = many.iter().map(String::as_str).collect();
    fleet
        .heartbeat(entry("a.test", "eu"), reach(&[], &names), t0)
        .unwrap();
    assert_eq!(
        fleet.live[&("a.test".to_owned(), 443)].names.len(),
        MAX_NAMES_PER_PROXY
    );

    let addrs: Vec<String> = (0..=MAX_ADDRS_PER_PROXY)
        .map(|i| format!("192.0.2.{i}"))
        .collect();
    let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let err = fleet
        .heartbeat(entry("b.test", "eu"), reach(&addrs, &[]), t0)
        .unwrap_err();
    assert!(
        matches!(err, HeartbeatError::Entry(EntryError::TooManyAddrs { .. })),
        "{err}"
    );
    let too_many = format!(
        "[[proxy]]\nname = \"s.test\"\nport = 1\nregion = \"x\"\naddrs = [{}]\n",
        addrs
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(matches!(
        FleetFile::parse(&too_many),
        Err(FleetError::Entry {
            source: EntryError::TooManyAddrs { .. },
            ..
        })
    ));
    assert!(matches!(
        FleetFile::parse(
            "[[proxy]]\nname = \"s.test\"\nport = 1\nregion = \"x\"\naddrs = [\"nope\"]\n"
        ),
        Err(FleetError::Parse(_))
    ));
}

#[test]
fn the_count_of_names_held_follows_heartbeats_leaves_and_expiry() {
    let mut fleet = fleet_of(vec![]);
    let t0 = Instant::now();
    let sum = |fleet: &Fleet| fleet.live.values().map(|l| l.names.len()).sum::<usize>();
    fleet
        .heartbeat(
            entry("a.test", "eu"),
            reach(&[], &["x.test", "y.test", "X.test"]),
            t0,
        )
        .unwrap();
    fleet
        .heartbeat(entry("b.test", "eu"), reach(&[], &["x.test"]), t0)
        .unwrap();
    assert_eq!(
        (fleet.names_held, sum(&fleet)),
        (3, 3),
        "a name given twice counts once"
    );
    let t1 = t0 + Duration::from_secs(1);
    fleet
        .heartbeat(entry("a.test", "eu"), reach(&[], &["z.test"]), t1)
        .unwrap();
    assert_eq!((fleet.names_held, sum(&fleet)), (2, 2));
    assert!(fleet.leave("b.test", 443));
    assert_eq!((fleet.names_held, sum(&fleet)), (1, 1));
    fleet.prune(t1 + Duration::from_secs(30));
    assert_eq!(
        (fleet.names_held, sum(&fleet)),
        (0, 0),
        "expired entries hold nothing"
    );
}

#[test]
fn joining_members_are_told_the_other_live_links() {
    let mut fleet = Fleet::new(FleetFile::default(), Duration::from_secs(30));
    let now = Instant::now();
    let link = |i: u8| -> std::net::SocketAddr { format!("192.0.2.{i}:7443").parse().unwrap() };
    for (i, peer) in [(1, Some(link(1))), (2, Some(link(2))), (3, None)] {
        let mut reach = reach(&[], &[]);
        reach.peer = peer;
        let entry = ProxyEntry {
            name: format!("p{i}.proxy.test"),
            port: 443,
            region: "eu".into(),
            onion: None,
        };
        fleet.heartbeat(entry, reach, now).unwrap();
    }
    // Not itself, not a proxy without a link, and at most as many as asked.
    assert_eq!(
        fleet.peer_links(("p1.proxy.test", 443), 16, now),
        vec![link(2)]
    );
    assert_eq!(
        fleet.peer_links(("p3.proxy.test", 443), 16, now),
        vec![link(1), link(2)]
    );
    assert_eq!(fleet.peer_links(("p3.proxy.test", 443), 1, now).len(), 1);
    // A member that stopped announcing itself is no longer named.
    let later = now + Duration::from_secs(31);
    assert!(fleet
        .peer_links(("p3.proxy.test", 443), 16, later)
        .is_empty());
}

#[test]
fn a_toml_error_is_one_line_that_says_where() {
    let err = FleetFile::parse("[[proxy]]\nname = \"a.test\nport = 443\n").unwrap_err();
    let text = err.to_string();
    assert!(!text.contains('\n'), "{text}");
    assert!(text.contains("line 2"), "{text}");
    assert!(
        text.starts_with("the fleet file is not valid: TOML parse error"),
        "{text}"
    );
}

#[test]
fn replacing_the_statics_counts_the_change_and_keeps_live_entries() {
    let mut fleet = fleet_of(vec![entry("a.test", "eu"), entry("b.test", "eu")]);
    let now = Instant::now();
    fleet
        .heartbeat(entry("live.test", "us"), Reach::default(), now)
        .unwrap();
    let file = FleetFile::parse(
        "[[proxy]]\nname = \"b.test\"\nport = 443\nregion = \"us\"\n\n\
         [[proxy]]\nname = \"c.test\"\nport = 443\nregion = \"eu\"\naddrs = [\"192.0.2.3\"]\n",
    )
    .unwrap();
    let change = fleet.replace_statics(file);
    assert_eq!(
        change,
        StaticsChange {
            added: 1,
            removed: 1,
            changed: 1,
            total: 2
        }
    );
    let mut names: Vec<String> = fleet.healthy(now).into_iter().map(|e| e.name).collect();
    names.sort();
    assert_eq!(names, ["b.test", "c.test", "live.test"]);
    // The new entries' addresses answer for them.
    assert_eq!(fleet.addresses("x.test", 3, now), ips(&["192.0.2.3"]));
    // The same file again changes nothing.
    let same = FleetFile {
        proxy: fleet
            .statics()
            .iter()
            .cloned()
            .map(|entry| StaticProxy {
                addrs: if entry.name == "c.test" {
                    ips(&["192.0.2.3"])
                } else {
                    Vec::new()
                },
                ..entry.into()
            })
            .collect(),
    };
    assert_eq!(
        fleet.replace_statics(same),
        StaticsChange {
            total: 2,
            ..StaticsChange::default()
        }
    );
}
