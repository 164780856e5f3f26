//! `pcguard check` warnings: configs that compile but break the server
//! they protect. Each warning says what breaks and the fix in one line.

use std::net::SocketAddr;

use super::compiled::{CompiledPolicy, RuleInfo};
use crate::{
    config::{Mode, SiteConfig},
    model::{Direction, Protocol},
};

/// One warning: what goes wrong, and the change that fixes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Warning {
    /// A stable name for scripts (`check --format json`).
    pub code: &'static str,
    pub message: String,
    pub fix: String,
}

const DNS_PORT: u16 = 53;

/// Every warning for `cfg` compiled as `p`, in a fixed order.
pub fn warnings(cfg: &SiteConfig, p: &CompiledPolicy) -> Vec<Warning> {
    let mut out = Vec::new();
    let egress_enforced = p.settings.egress_mode == Mode::Enforce;
    let rules = || p.current_rules();
    let dns_rules: Vec<&RuleInfo> = rules()
        .filter(|r| r.direction == Direction::Outbound && r.protocol == Protocol::Udp && covers(r, DNS_PORT))
        .collect();
    if egress_enforced && dns_rules.is_empty() {
        out.push(Warning {
            code: "dns_dropped",
            message: "egress is enforced and no rule allows outbound DNS (udp/53): the server cannot resolve \
                      names (directory, database, mail and licensing hosts by name fail)"
                .to_string(),
            fix: "set peers.dns = [\"<your resolvers>\"] (enables the dns feature)".to_string(),
        });
    }
    let cloud: Vec<&str> =
        rules().filter(|r| r.direction == Direction::Outbound && !r.fqdns.is_empty()).map(|r| r.id.as_str()).collect();
    if egress_enforced && !cloud.is_empty() && p.settings.resolver_mask == 0 {
        let what = if dns_rules.is_empty() {
            "no resolver class"
        } else {
            "DNS is allowed only to `any`, whose answers are never trusted"
        };
        out.push(Warning {
            code: "cloud_without_resolver",
            message: format!(
                "egress is enforced and rules {} reach cloud endpoints by name, but {what}: their addresses are \
                 never learned and the connections are dropped (with ges, MF licensing fails)",
                cloud.join(", ")
            ),
            fix: "set peers.dns = [\"<your resolvers>\"]: answers from those resolvers open the documented names"
                .to_string(),
        });
    }
    if let Some(w) = scrape_warning(cfg.metrics_listen(), p) {
        out.push(w);
    }
    if let crate::config::AuditAllowed::Rules(globs) = &cfg.audit.allowed {
        for g in globs {
            if !rules().any(|r| crate::config::glob_match(g, &r.id)) {
                out.push(Warning {
                    code: "audit_allowed_unmatched",
                    message: format!("[audit] allowed names \"{g}\", which matches no rule: no flow records for it"),
                    fix: "use rule ids as `pcguard check` lists them (e.g. \"web-*\", \"admin-ssh\")".to_string(),
                });
            }
        }
    }
    out
}

/// Metrics served off loopback but no inbound rule lets a scraper reach them.
fn scrape_warning(listen: SocketAddr, p: &CompiledPolicy) -> Option<Warning> {
    if listen.ip().is_loopback() {
        return None;
    }
    let port = listen.port();
    let allowed =
        p.current_rules().any(|r| r.direction == Direction::Inbound && r.protocol == Protocol::Tcp && covers(r, port));
    if allowed {
        return None;
    }
    let outcome = match p.settings.ingress_mode {
        Mode::Enforce => "dropped",
        Mode::Monitor => "reported as no_rule flows now and dropped once ingress is enforced",
    };
    Some(Warning {
        code: "metrics_unreachable",
        message: format!(
            "[metrics] listen = \"{listen}\" is off loopback but no inbound rule allows tcp/{port}: scrapes are \
             {outcome}"
        ),
        fix: format!(
            "add a [[rule]] with direction = \"inbound\", protocol = \"tcp\", ports = [{port}], peers = [\"<your \
             Prometheus class>\"]"
        ),
    })
}

fn covers(r: &RuleInfo, port: u16) -> bool {
    r.ports.iter().any(|range| range.contains(port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config, policy::compile};

    fn warn(toml: &str) -> Vec<&'static str> {
        let cfg = config::parse(toml, "t.toml").unwrap();
        let p = compile(&cfg).unwrap();
        warnings(&cfg, &p).iter().map(|w| w.code).collect()
    }

    const BASE: &str = "role = \"primary\"\ninterfaces = [\"eth0\"]\nmode = \"enforce\"\n";
    const PEERS: &str = "[peers]\nworkstations = [\"10.0.0.0/24\"]\n";

    #[test]
    fn a_clean_config_has_no_warnings() {
        let toml = format!("{BASE}{PEERS}dns = [\"10.0.0.53\"]\n[features]\nges = true\n");
        assert_eq!(warn(&toml), Vec::<&str>::new());
        // Monitor egress drops nothing: no DNS warning.
        let toml = format!("{BASE}egress_mode = \"monitor\"\n{PEERS}[features]\nges = true\n");
        assert_eq!(warn(&toml), Vec::<&str>::new());
    }

    #[test]
    fn egress_enforce_without_resolvers_warns_about_dns_and_cloud() {
        let toml = format!("{BASE}{PEERS}[features]\nges = true\n");
        assert_eq!(warn(&toml), ["dns_dropped", "cloud_without_resolver"]);
        let toml = format!("{BASE}{PEERS}");
        assert_eq!(warn(&toml), ["dns_dropped"]);
    }

    #[test]
    fn dns_to_any_only_still_leaves_cloud_names_unlearned() {
        let toml = format!(
            "{BASE}{PEERS}[features]\nges = true\n[[rule]]\nname = \"dns-any\"\ndirection = \"outbound\"\n\
             protocol = \"udp\"\nports = [53]\npeers = [\"any\"]\n"
        );
        assert_eq!(warn(&toml), ["cloud_without_resolver"]);
    }

    #[test]
    fn audited_globs_that_match_no_rule_warn() {
        let audit = "[audit]\nallowed = [\"web-*\", \"no-such-rule\", \"admin-s?h\"]\n";
        let toml = format!("{BASE}egress_mode = \"monitor\"\n{audit}{PEERS}admin = [\"10.0.0.10\"]\n");
        let cfg = config::parse(&toml, "t.toml").unwrap();
        let p = compile(&cfg).unwrap();
        let w = warnings(&cfg, &p);
        assert_eq!(w.iter().map(|w| w.code).collect::<Vec<_>>(), ["audit_allowed_unmatched"]);
        assert!(w[0].message.contains("\"no-such-rule\""), "{}", w[0].message);
    }

    #[test]
    fn metrics_off_loopback_need_an_inbound_rule() {
        let metrics = "[metrics]\nlisten = \"0.0.0.0:9750\"\n";
        let toml = format!("{BASE}egress_mode = \"monitor\"\n{metrics}{PEERS}");
        assert_eq!(warn(&toml), ["metrics_unreachable"]);
        let rule = "[[rule]]\nname = \"scrape\"\ndirection = \"inbound\"\nprotocol = \"tcp\"\nports = [9750]\n\
                    peers = [\"monitoring\"]\n";
        let toml = format!("{BASE}egress_mode = \"monitor\"\n{metrics}{PEERS}monitoring = [\"10.0.0.9\"]\n{rule}");
        assert_eq!(warn(&toml), Vec::<&str>::new());
        // Loopback (the default) needs nothing.
        let toml = format!("{BASE}egress_mode = \"monitor\"\n{PEERS}");
        assert_eq!(warn(&toml), Vec::<&str>::new());
    }
}
