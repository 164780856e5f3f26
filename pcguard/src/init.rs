//! `pcguard init --papercut-dir DIR`: a starter site config (monitor mode)
//! from an installed PaperCut server's own files, every line with a
//! comment saying where its value came from.
//!
//! What is read, and on what authority (docs/config.md, "pcguard init"):
//! - `[app-path]/server/server.properties`, `server.port`: PaperCut's
//!   manual ("Open the file server.properties. Change the server.port to
//!   setting to the desired port.").
//! - `server.ssl.port`, `database.type`, `database.url` in the same file,
//!   and `ApplicationServer` in a secondary's
//!   `[app-path]/providers/print/<platform>/print-provider.conf`: the
//!   manual names the files but no stored PaperCut page names these keys;
//!   they are the keys of installed servers' files. The comments say so.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

/// The manual's sentences behind `server.port` (PaperCut MF 14 manual,
/// "System Security Options", stored as docs/papercut/system-security-options-v14.txt).
pub const SERVER_PORT_QUOTE: [&str; 2] =
    ["Open the file server.properties.", "Change the server.port to setting to the desired port."];

/// Where a value came from, for the line's comment.
const UNDOCUMENTED: &str = "a key of installed servers' files, not named by a stored PaperCut page: check it";

/// Java properties (`key=value`, `key: value`, `key value`; `#`/`!`
/// comments; backslash escapes of one character). Enough for the keys
/// read here; line continuations are joined.
pub fn parse_properties(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut logical = String::new();
    for raw in text.lines() {
        let line = raw.trim_start();
        if logical.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with('!')) {
            continue;
        }
        let continued = line.ends_with('\\') && !line.ends_with("\\\\");
        logical.push_str(if continued { &line[..line.len() - 1] } else { line });
        if continued {
            continue;
        }
        let entry = std::mem::take(&mut logical);
        let split = entry
            .char_indices()
            .scan(false, |escaped, (i, c)| {
                let here = !*escaped && matches!(c, '=' | ':' | ' ' | '\t');
                *escaped = !*escaped && c == '\\';
                Some((i, here))
            })
            .find(|(_, sep)| *sep)
            .map(|(i, _)| i);
        let (key, value) = match split {
            Some(i) => {
                let rest = entry[i..].trim_start_matches([' ', '\t']);
                let rest = rest.strip_prefix(['=', ':']).unwrap_or(rest);
                (&entry[..i], rest.trim_start_matches([' ', '\t']))
            }
            None => (entry.as_str(), ""),
        };
        out.insert(unescape(key), unescape(value.trim_end()));
    }
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (c, c == '\\') {
            (_, true) => match chars.next() {
                Some('t') => out.push('\t'),
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => {}
            },
            (c, false) => out.push(c),
        }
    }
    out
}

/// The database of `database.type` / `database.url`: (catalog value, host,
/// port if given). `None` for the internal database.
/// An external database: (catalog value, host, port if the URL gives one).
type Database = (&'static str, String, Option<u16>);

fn database(kind: &str, url: &str) -> Result<Option<Database>, String> {
    let name = match kind.to_ascii_lowercase().as_str() {
        "" | "internal" => return Ok(None),
        "sqlserver" => "sqlserver",
        "postgresql" => "postgresql",
        "mysql" => "mysql",
        "oracle" => "oracle",
        _ => {
            return Err(format!("database.type \"{kind}\" is none of Internal, SQLServer, PostgreSQL, MySQL, Oracle"));
        }
    };
    // jdbc:postgresql://host:5432/db, jdbc:sqlserver://host:1433;..., jdbc:jtds:sqlserver://host/db,
    // jdbc:mysql://host:3306/db, jdbc:oracle:thin:@host:1521:SID, jdbc:oracle:thin:@//host:1521/svc
    let rest = match (url.find("//"), url.find('@')) {
        (Some(i), _) => &url[i + 2..],
        (None, Some(i)) => &url[i + 1..],
        (None, None) => return Err(format!("database.url \"{url}\" names no host")),
    };
    let end = rest.find(['/', ';', '?']).unwrap_or(rest.len());
    let hostport = &rest[..end];
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or(format!("database.url \"{url}\": unclosed ["))?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    // Oracle's thin form: host:port:SID.
    let port = port.map(|p| p.split(':').next().unwrap_or(p));
    let port = match port {
        None | Some("") => None,
        Some(p) => {
            Some(p.parse::<u16>().ok().filter(|p| *p > 0).ok_or(format!("database.url \"{url}\": bad port {p:?}"))?)
        }
    };
    if host.is_empty() {
        return Err(format!("database.url \"{url}\" names no host"));
    }
    Ok(Some((name, host, port)))
}

/// The catalog's default port of each database (db-* entries).
fn default_db_port(name: &str) -> u16 {
    match name {
        "sqlserver" => 1433,
        "postgresql" => 5432,
        "mysql" => 3306,
        _ => 1521,
    }
}

/// A peers line for `host`: the address when it is one, else a comment
/// (peer classes take addresses, not names).
fn peer_line(out: &mut String, class: &str, host: &str, source: &str) {
    match host.parse::<IpAddr>() {
        Ok(ip) => {
            let _ = writeln!(out, "{class} = [\"{ip}\"]   # {source}");
        }
        Err(_) => {
            let _ = writeln!(out, "# {class} = [\"...\"]   # {source}: \"{host}\" is a name; put its address(es) here");
        }
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

/// The print provider's config under `dir/providers/print/*/`.
fn print_provider_conf(dir: &Path) -> Option<PathBuf> {
    let providers = dir.join("providers/print");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&providers)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("print-provider.conf")))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.into_iter().next()
}

/// A starter config for the PaperCut installation in `dir`, attached to
/// `interface`: a primary when `server/server.properties` exists, else a
/// secondary when a print provider's `print-provider.conf` does.
pub fn starter_config(dir: &Path, interface: &str) -> Result<String, String> {
    let props_path = dir.join("server/server.properties");
    let mut out = format!(
        "# pcguard site config written by `pcguard init --papercut-dir {}`.\n\
         # Every value says where it came from. Fill in the peer classes, run\n\
         # `pcguard check` on this file, watch the audit log in monitor mode,\n\
         # then set mode = \"enforce\". docs/config.md has every key.\n\n",
        dir.display()
    );
    if props_path.is_file() {
        let props = parse_properties(&read(&props_path)?);
        let p = props_path.display();
        let port = |key: &str, default: u16| -> Result<(u16, bool), String> {
            match props.get(key).map(|v| v.trim()).filter(|v| !v.is_empty()) {
                None => Ok((default, false)),
                Some(v) => v
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .map(|p| (p, true))
                    .ok_or(format!("{p}: {key} = \"{v}\" is not a port number")),
            }
        };
        let (http, http_set) = port("server.port", 9191)?;
        let (https, https_set) = port("server.ssl.port", 9192)?;
        if http == https {
            return Err(format!("{p}: server.port and server.ssl.port are both {http}"));
        }
        let db = database(
            props.get("database.type").map_or("", String::as_str),
            props.get("database.url").map_or("", String::as_str),
        )
        .map_err(|e| format!("{p}: {e}"))?;
        let _ = writeln!(out, "role = \"primary\"   # {p} exists (a Site Server has one too: then \"site-server\")");
        let _ = writeln!(out, "interfaces = [\"{interface}\"]   # pcguard init --interface (or the default route's)");
        let _ = writeln!(
            out,
            "mode = \"monitor\"   # pcguard init: report, drop nothing, until you have read the audit log"
        );
        out.push_str("\n[peers]\n");
        out.push_str("# workstations = [\"...\"]   # not in PaperCut's files: your clients' networks\n");
        out.push_str("# devices = [\"...\"]        # not in PaperCut's files: your MFDs and printers\n");
        out.push_str("# admin = [\"...\"]          # not in PaperCut's files: administrators (SSH always allowed)\n");
        let mut features = String::new();
        if let Some((name, host, db_port)) = &db {
            let source = format!("database.url in {p} ({UNDOCUMENTED})");
            peer_line(&mut out, "database", host, &source);
            let comment = if host.parse::<IpAddr>().is_ok() { "" } else { "# " };
            let _ = writeln!(features, "{comment}database = \"{name}\"   # database.type in {p} ({UNDOCUMENTED})");
            if let Some(dp) = db_port.filter(|dp| *dp != default_db_port(name)) {
                let _ = writeln!(features, "{comment}database_port = {dp}   # database.url in {p}");
            }
        }
        out.push_str("\n[features]\n");
        if db.is_none() {
            let _ = writeln!(out, "database = \"internal\"   # database.type in {p} is Internal or not set");
        }
        out.push_str(&features);
        out.push_str("\n[papercut]\n");
        let http_from = if http_set {
            format!("server.port in {p} (PaperCut manual, \"System Security Options\")")
        } else {
            format!("server.port not set in {p}: PaperCut's default")
        };
        let https_from = if https_set {
            format!("server.ssl.port in {p} ({UNDOCUMENTED})")
        } else {
            format!("server.ssl.port not set in {p}: PaperCut's default")
        };
        let _ = writeln!(out, "http_port = {http}   # {http_from}");
        let _ = writeln!(out, "https_port = {https}   # {https_from}");
        return Ok(out);
    }
    let Some(conf) = print_provider_conf(dir) else {
        return Err(format!(
            "{}: neither server/server.properties (an Application Server) nor providers/print/*/print-provider.conf (a secondary server)",
            dir.display()
        ));
    };
    let props = parse_properties(&read(&conf)?);
    let c = conf.display();
    let _ = writeln!(out, "role = \"secondary\"   # {c} exists and {} does not", props_path.display());
    let _ = writeln!(out, "interfaces = [\"{interface}\"]   # pcguard init --interface (or the default route's)");
    let _ =
        writeln!(out, "mode = \"monitor\"   # pcguard init: report, drop nothing, until you have read the audit log");
    out.push_str("\n[peers]\n");
    match props.get("ApplicationServer").map(|v| v.trim()).filter(|v| !v.is_empty()) {
        Some(host) => {
            peer_line(&mut out, "primary_server", host, &format!("ApplicationServer in {c} ({UNDOCUMENTED})"))
        }
        None => {
            let _ = writeln!(
                out,
                "# primary_server = [\"...\"]   # ApplicationServer not set in {c}: the primary's address"
            );
        }
    }
    out.push_str("# workstations = [\"...\"]   # not in PaperCut's files: your clients' networks\n");
    out.push_str("# devices = [\"...\"]        # not in PaperCut's files: the printers this server drives\n");
    out.push_str("# admin = [\"...\"]          # not in PaperCut's files: administrators (SSH always allowed)\n");
    let _ = writeln!(
        out,
        "\n# The primary's web ports: no documented key of {c} gives them; if the primary\n\
         # moved them (its server.port / server.ssl.port), set them here:\n\
         # [papercut]\n# http_port = 9191\n# https_port = 9192"
    );
    Ok(out)
}

/// The interface of the default route (`/proc/net/route`), if any.
pub fn default_route_interface() -> Option<String> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[1] == "00000000").then(|| f[0].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    /// A PaperCut directory with `files` (path -> text) under a fresh
    /// temporary directory.
    fn install(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pcguard-init-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (path, text) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        dir
    }

    fn checked(text: &str) -> config::SiteConfig {
        config::parse(text, "init.toml").unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn properties_as_java_reads_them() {
        let p = parse_properties(
            "# comment\n! also\nserver.port=80\nserver.ssl.port : 443\nkey value\nadmin.password=HASH\\:$2a\n\
             multi=a\\\n   b\nempty=\n",
        );
        assert_eq!(p["server.port"], "80");
        assert_eq!(p["server.ssl.port"], "443");
        assert_eq!(p["key"], "value");
        assert_eq!(p["admin.password"], "HASH:$2a");
        assert_eq!(p["multi"], "ab");
        assert_eq!(p["empty"], "");
    }

    #[test]
    fn jdbc_urls() {
        let d = |t: &str, u: &str| database(t, u).unwrap();
        assert_eq!(d("Internal", ""), None);
        assert_eq!(
            d("PostgreSQL", "jdbc:postgresql://192.0.2.6:5433/papercut"),
            Some(("postgresql", "192.0.2.6".into(), Some(5433)))
        );
        assert_eq!(
            d("SQLServer", "jdbc:sqlserver://db.example.com:1433;databaseName=pc"),
            Some(("sqlserver", "db.example.com".into(), Some(1433)))
        );
        assert_eq!(d("SQLServer", "jdbc:jtds:sqlserver://192.0.2.7/pc"), Some(("sqlserver", "192.0.2.7".into(), None)));
        assert_eq!(
            d("Oracle", "jdbc:oracle:thin:@192.0.2.8:1522:PC"),
            Some(("oracle", "192.0.2.8".into(), Some(1522)))
        );
        assert_eq!(d("MySQL", "jdbc:mysql://[2001:db8::6]:3306/pc"), Some(("mysql", "2001:db8::6".into(), Some(3306))));
        assert!(database("DB2", "jdbc:db2://x").unwrap_err().contains("DB2"));
        assert!(database("MySQL", "jdbc:mysql://h:99999/x").unwrap_err().contains("bad port"));
    }

    #[test]
    fn a_primary_with_moved_ports_and_an_external_database() {
        // As in PaperCut's manual: [app-path]/server/server.properties.
        let dir = install(
            "primary",
            &[(
                "server/server.properties",
                "### Web server ###\nserver.port=80\nserver.ssl.port=443\n\
                 database.type=PostgreSQL\ndatabase.url=jdbc:postgresql://192.0.2.6:5433/papercut\ndatabase.username=pc\n",
            )],
        );
        let text = starter_config(&dir, "eth1").unwrap();
        for line in text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#') && !l.starts_with('[')) {
            assert!(line.contains("   # "), "every value says where it came from: {line}");
        }
        assert!(text.contains("http_port = 80   # server.port in"), "{text}");
        assert!(text.contains("https_port = 443   # server.ssl.port in"), "{text}");
        let cfg = checked(&text);
        assert_eq!(
            (cfg.role, cfg.mode, cfg.interfaces.clone()),
            (config::Role::Primary, config::Mode::Monitor, vec!["eth1".into()])
        );
        assert!(cfg.features.contains("database:postgresql"));
        let db = crate::catalog::Catalog::builtin().service("db-postgresql").unwrap();
        assert_eq!(crate::model::format_ports(&cfg.service_ports(db)), "5433");
        assert_eq!(cfg.peers["database"], vec!["192.0.2.6/32".parse().unwrap()]);
        assert!(cfg.notes.iter().any(|n| n.contains("9191 -> 80")), "{:?}", cfg.notes);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_primary_with_defaults_and_a_database_by_name() {
        let dir = install(
            "defaults",
            &[(
                "server/server.properties",
                "database.type=SQLServer\ndatabase.url=jdbc:sqlserver://db.example.com:1433;databaseName=pc\n",
            )],
        );
        let text = starter_config(&dir, "eth0").unwrap();
        assert!(text.contains("http_port = 9191   # server.port not set in"), "{text}");
        assert!(text.contains("# database = [\"...\"]") && text.contains("\"db.example.com\" is a name"), "{text}");
        let cfg = checked(&text);
        assert!(!cfg.features.iter().any(|f| f.starts_with("database:")), "no address, no database rule");
        assert!(!cfg.notes.iter().any(|n| n.contains("moved")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_secondary_from_its_print_provider() {
        let dir = install(
            "secondary",
            &[(
                "providers/print/linux-x64/print-provider.conf",
                "# Print provider\nServerName=print2\nApplicationServer=192.0.2.1\n",
            )],
        );
        let text = starter_config(&dir, "eth0").unwrap();
        assert!(text.contains("primary_server = [\"192.0.2.1\"]   # ApplicationServer in"), "{text}");
        let cfg = checked(&text);
        assert_eq!(cfg.role, config::Role::Secondary);
        assert!(cfg.features.contains("upstream"));
        assert_eq!(cfg.peers["primary_server"], vec!["192.0.2.1/32".parse().unwrap()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_installations_are_errors_naming_the_file() {
        let dir = install("bad", &[("server/server.properties", "server.port=http\n")]);
        let e = starter_config(&dir, "eth0").unwrap_err();
        assert!(e.contains("server.properties: server.port = \"http\" is not a port number"), "{e}");
        std::fs::write(dir.join("server/server.properties"), "server.port=9192\n").unwrap();
        assert!(starter_config(&dir, "eth0").unwrap_err().contains("both 9192"));
        std::fs::write(dir.join("server/server.properties"), "database.type=Sybase\n").unwrap();
        assert!(starter_config(&dir, "eth0").unwrap_err().contains("Sybase"));
        std::fs::remove_dir_all(&dir).unwrap();
        let empty = install("empty", &[("README", "")]);
        assert!(starter_config(&empty, "eth0").unwrap_err().contains("neither server/server.properties"));
        std::fs::remove_dir_all(&empty).unwrap();
    }

    #[test]
    fn the_quoted_manual_sentences_are_verbatim() {
        let page = crate::catalog::document("security-options-v14").unwrap();
        for part in SERVER_PORT_QUOTE {
            assert!(page.text.contains(part), "{part:?}");
        }
    }
}
