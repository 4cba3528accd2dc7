//! Who may use a terminate route: ordered allow/deny rules over verified
//! SPIFFE IDs, the peer gateways trusted to vouch for a caller, and the hook
//! through which the TLS handshake itself refuses a caller.
//!
//! # Deciding inside the handshake
//!
//! A caller refused while its certificate is verified gets the TLS alert
//! `access_denied` (rustls sends it for
//! `CertificateError::ApplicationVerificationFailure`): the client learns it
//! is not allowed, instead of seeing a bare close it might retry. But a
//! rustls `ServerConfig` fixes its client verifier when it is built (the
//! field is private, so a clone cannot swap it), and the verifier is not
//! told which connection it verifies; building a config per connection goes
//! through rustls' builder, which allocates a fresh session cache every time.
//! So the connection puts what its handshake must check into a task-local
//! ([`HandshakeAuthz::run`]) around the handshake future, and the one shared
//! verifier reads it ([`in_handshake`]). That works because rustls calls the
//! verifier synchronously while tokio-rustls polls the handshake future on
//! the connection's own task. A verifier called outside such a scope refuses.
//!
//! A resumed TLS session skips the verifier, so connections authorize again
//! after the handshake with the same rules.

use std::cell::Cell;
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use crate::spiffe::{SpiffeId, SpiffePattern, TrustDomain};

/// What a matching rule does.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Action {
    Allow,
    Deny,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// One authorization rule: `action` for the IDs `pattern` matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    pub(crate) action: Action,
    pub(crate) pattern: SpiffePattern,
}

/// A route's rules in order: the first whose pattern matches decides; when
/// none matches (or there are none) the caller is denied.
#[derive(Debug, Default)]
pub(crate) struct Rules(Vec<Rule>);

impl Rules {
    pub(crate) fn new(rules: Vec<Rule>) -> Self {
        Self(rules)
    }

    /// The decision for `id`. Allocation-free; linear in the rules.
    pub(crate) fn evaluate(&self, id: &SpiffeId) -> Verdict<'_> {
        self.0
            .iter()
            .enumerate()
            .find(|(_, rule)| rule.pattern.matches(id))
            .map_or(Verdict::NoMatch, |(index, rule)| Verdict::Rule {
                index,
                rule,
            })
    }
}

/// The outcome of [`Rules::evaluate`]: the deciding rule, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict<'r> {
    /// `rules[index]` matched first and decides.
    Rule { index: usize, rule: &'r Rule },
    /// No rule matched: denied.
    NoMatch,
}

impl Verdict<'_> {
    pub(crate) fn allowed(&self) -> bool {
        matches!(self, Self::Rule { rule, .. } if rule.action == Action::Allow)
    }
}

/// The peer gateways of a terminate listener that may vouch for a caller.
#[derive(Debug, Default)]
pub(crate) struct TrustedGateways(HashSet<SpiffeId>);

impl TrustedGateways {
    pub(crate) fn new(ids: impl IntoIterator<Item = SpiffeId>) -> Self {
        Self(ids.into_iter().collect())
    }

    pub(crate) fn contains(&self, id: &SpiffeId) -> bool {
        self.0.contains(id)
    }
}

/// A refused caller, as counted and logged.
#[derive(Debug)]
pub(crate) struct Denial<'a> {
    /// The identity refused: the TLS peer, or the caller a gateway vouched for.
    pub(crate) caller: &'a SpiffeId,
    /// The gateway that vouched for `caller`, if it came over the hop protocol.
    pub(crate) via: Option<&'a SpiffeId>,
    pub(crate) reason: Reason<'a>,
    pub(crate) stage: Stage,
}

impl Denial<'_> {
    /// The trust domain the attempt is counted under: the vouching gateway's
    /// when there is one (a gateway may only vouch for its own domain, so a
    /// forged `east.mesh` caller from west's gateway counts as west's), else
    /// the caller's. Always a domain whose bundle verified the TLS peer, so
    /// the keys are bounded by `trust_bundles`.
    pub(crate) fn trust_domain(&self) -> &TrustDomain {
        self.via.unwrap_or(self.caller).trust_domain()
    }
}

/// Why a caller was refused.
#[derive(Debug)]
pub(crate) enum Reason<'a> {
    /// The route's rules said no.
    Verdict(Verdict<'a>),
    /// The TLS peer offered the hop protocol but is not in `trusted_gateways`.
    UntrustedGateway,
    /// The gateway vouched for a caller outside its own trust domain.
    ForeignTrustDomain,
    /// The gateway's caller TLV is unusable.
    BadAssertion(&'a str),
}

impl fmt::Display for Reason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Verdict(Verdict::Rule { index, rule }) => {
                write!(
                    f,
                    "rules[{index}] ({} {})",
                    rule.action.as_str(),
                    rule.pattern
                )
            }
            Self::Verdict(Verdict::NoMatch) => f.write_str("no rule matched (default deny)"),
            Self::UntrustedGateway => {
                f.write_str("offered meshfed-caller/1 but is not in trusted_gateways")
            }
            Self::ForeignTrustDomain => {
                f.write_str("vouched-for caller is outside the vouching gateway's own trust domain")
            }
            Self::BadAssertion(why) => write!(f, "unusable caller TLV 0xE0: {why}"),
        }
    }
}

/// Where in a connection a caller was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// While verifying its certificate: the client got `access_denied`.
    Handshake,
    /// After the handshake (a resumed session skips the verifier): closed.
    AfterHandshake,
    /// After the hop protocol's caller header: closed.
    CallerHeader,
}

impl Stage {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Handshake => "handshake",
            Self::AfterHandshake => "after handshake",
            Self::CallerHeader => "caller header",
        }
    }
}

/// Where denials are counted and logged (a listener's stats).
pub(crate) trait DenialSink: Send + Sync {
    /// Counts and logs one denial.
    fn report(&self, listener: &str, sni: Option<&str>, denial: &Denial<'_>);
}

/// What a terminate handshake must establish beyond a valid SVID.
pub(crate) enum HandshakeCheck {
    /// The peer is the caller: the route's rules decide.
    Rules(Arc<Rules>),
    /// The peer asked for the hop protocol: it must be a trusted gateway
    /// (its caller is known only from the header after the handshake).
    TrustedGateway(Arc<TrustedGateways>),
    /// Nothing to decide yet (no route for the SNI; counted as `no_route`
    /// after the handshake, as before).
    Deferred,
}

tokio::task_local! {
    /// The authorization of the handshake being polled on this task.
    static HANDSHAKE: HandshakeAuthz;
}

/// One connection's handshake authorization: what to check, and where a
/// refusal is counted.
pub(crate) struct HandshakeAuthz {
    check: HandshakeCheck,
    sink: Arc<dyn DenialSink>,
    listener: Arc<str>,
    sni: Option<String>,
    denied: Cell<bool>,
    verified: Cell<Option<SpiffeId>>,
}

/// What a handshake run under [`HandshakeAuthz::run`] left behind.
#[derive(Debug, Default)]
pub(crate) struct HandshakeOutcome {
    /// The SNI handed in, handed back.
    pub(crate) sni: Option<String>,
    /// The verifier refused the peer (already counted and logged).
    pub(crate) denied: bool,
    /// The peer the verifier checked and let through; `None` when it did
    /// not run (a resumed session).
    pub(crate) verified: Option<SpiffeId>,
}

impl HandshakeAuthz {
    pub(crate) fn new(
        check: HandshakeCheck,
        sink: Arc<dyn DenialSink>,
        listener: Arc<str>,
        sni: Option<String>,
    ) -> Self {
        Self {
            check,
            sink,
            listener,
            sni,
            denied: Cell::new(false),
            verified: Cell::new(None),
        }
    }

    /// Drives `handshake` with this authorization visible to the verifier.
    pub(crate) async fn run<F: Future>(self, handshake: F) -> (F::Output, HandshakeOutcome) {
        let mut scoped = std::pin::pin!(HANDSHAKE.scope(self, handshake));
        let output = scoped.as_mut().await;
        let outcome = scoped
            .as_mut()
            .take_value()
            .map(|ctx| HandshakeOutcome {
                sni: ctx.sni,
                denied: ctx.denied.get(),
                verified: ctx.verified.take(),
            })
            .unwrap_or_default();
        (output, outcome)
    }

    fn check(&self, peer: SpiffeId) -> bool {
        let refusal = match &self.check {
            HandshakeCheck::Deferred => None,
            HandshakeCheck::Rules(rules) => {
                let verdict = rules.evaluate(&peer);
                (!verdict.allowed()).then_some(Reason::Verdict(verdict))
            }
            HandshakeCheck::TrustedGateway(trusted) => {
                (!trusted.contains(&peer)).then_some(Reason::UntrustedGateway)
            }
        };
        let Some(reason) = refusal else {
            self.verified.set(Some(peer));
            return true;
        };
        // Counted here, before rustls writes the alert: whoever sees the
        // alert also sees the count.
        let denial = Denial {
            caller: &peer,
            via: None,
            reason,
            stage: Stage::Handshake,
        };
        self.sink
            .report(&self.listener, self.sni.as_deref(), &denial);
        self.denied.set(true);
        false
    }
}

/// Called by the client verifier of terminate listeners with a peer whose
/// chain it validated; `false` refuses it with `access_denied`.
pub(crate) fn in_handshake(peer: SpiffeId) -> bool {
    HANDSHAKE.try_with(|ctx| ctx.check(peer)).unwrap_or_else(|_| {
        tracing::warn!(
            "a client certificate was verified outside a connection's handshake scope; refused (a meshfed bug: please report it)"
        );
        false
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use proptest::prelude::*;

    use super::*;

    fn id(text: &str) -> SpiffeId {
        SpiffeId::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn rule(action: Action, pattern: &str) -> Rule {
        let pattern = SpiffePattern::parse(pattern).unwrap_or_else(|e| panic!("{e}"));
        Rule { action, pattern }
    }

    #[test]
    fn first_match_wins_and_no_match_denies() {
        let rules = Rules::new(vec![
            rule(Action::Deny, "spiffe://west.mesh/ns/shop/sa/intruder"),
            rule(Action::Allow, "spiffe://west.mesh/ns/shop/*"),
        ]);
        let cart = id("spiffe://west.mesh/ns/shop/sa/cart");
        let intruder = id("spiffe://west.mesh/ns/shop/sa/intruder");
        let other = id("spiffe://west.mesh/ns/pay/sa/x");
        assert!(rules.evaluate(&cart).allowed());
        assert!(matches!(
            rules.evaluate(&cart),
            Verdict::Rule { index: 1, .. }
        ));
        assert!(!rules.evaluate(&intruder).allowed());
        assert_eq!(rules.evaluate(&other), Verdict::NoMatch);
        assert!(!Rules::default().evaluate(&cart).allowed());
        let reason = Reason::Verdict(rules.evaluate(&intruder)).to_string();
        assert_eq!(
            reason,
            "rules[0] (deny spiffe://west.mesh/ns/shop/sa/intruder)"
        );
    }

    /// Counts denials; records what it was told.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl DenialSink for Recorder {
        fn report(&self, listener: &str, sni: Option<&str>, denial: &Denial<'_>) {
            let line = format!(
                "{listener} {} {} {} {}",
                sni.unwrap_or("-"),
                denial.caller,
                denial.reason,
                denial.stage.as_str()
            );
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    }

    #[tokio::test]
    async fn the_handshake_scope_decides_and_outside_it_the_verifier_refuses() {
        let cart = id("spiffe://west.mesh/ns/shop/sa/cart");
        assert!(!in_handshake(cart.clone()), "no scope must mean refused");

        let recorder = Arc::new(Recorder::default());
        let rules = Arc::new(Rules::new(vec![rule(Action::Deny, "spiffe://west.mesh/*")]));
        let ctx = HandshakeAuthz::new(
            HandshakeCheck::Rules(rules),
            recorder.clone(),
            Arc::from("ingress"),
            Some("web.east.mesh".to_owned()),
        );
        let (allowed, outcome) = ctx.run(async { in_handshake(cart.clone()) }).await;
        assert!(!allowed);
        assert!(outcome.denied && outcome.verified.is_none());
        assert_eq!(outcome.sni.as_deref(), Some("web.east.mesh"));
        let lines = recorder.0.lock().map(|l| l.clone()).unwrap_or_default();
        assert_eq!(
            lines,
            [
                "ingress web.east.mesh spiffe://west.mesh/ns/shop/sa/cart rules[0] (deny spiffe://west.mesh/*) handshake"
            ]
        );

        let trusted = Arc::new(TrustedGateways::new([cart.clone()]));
        let ctx = HandshakeAuthz::new(
            HandshakeCheck::TrustedGateway(trusted),
            recorder.clone(),
            Arc::from("ingress"),
            None,
        );
        let (allowed, outcome) = ctx.run(async { in_handshake(cart.clone()) }).await;
        assert!(allowed && !outcome.denied);
        assert_eq!(outcome.verified, Some(cart));
    }

    /// What authorizing in the handshake costs per connection, against the
    /// alternative (a `ServerConfig` per connection, built with rustls'
    /// builder around a per-connection verifier; a clone cannot swap the
    /// verifier) and a whole mTLS handshake. Run by hand:
    /// `cargo test --release -p meshfed-gateway --lib handshake_authorization_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "measurement, not a check; run by hand in release"]
    fn handshake_authorization_cost() {
        use std::time::Instant;

        use rustls::server::ResolvesServerCert;
        use rustls::{ClientConnection, ServerConfig, ServerConnection};
        use serde_json::json;

        use crate::config::{CompiledConfig, ListenerMode};
        use crate::test_certs::TestDomain;

        let east = TestDomain::new("east.mesh");
        let gateway = "spiffe://east.mesh/ns/meshfed-system/sa/gateway";
        let svid = east.svid(gateway);
        let doc = json!({
            "identity": {"cert_chain_pem": svid.cert_pem, "private_key_pem": svid.key_pem},
            "trust_bundles": {"east.mesh": east.bundle_pem()},
            "listeners": [{"name": "in", "address": "127.0.0.1:0", "mode": "terminate",
                "routes": [{"sni": "web", "cluster": "self",
                            "rules": [{"action": "allow", "id": "*"}]}]}],
            "clusters": [{"name": "self", "endpoints": [{"address": "127.0.0.1:1"}],
                          "tls": {"sni": "web", "peer_spiffe_id": gateway}}]
        });
        let config =
            CompiledConfig::from_json(doc.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let Some(ListenerMode::Terminate { routes, tls }) = config.listener("in").map(|l| &l.mode)
        else {
            panic!("not terminate");
        };
        let rules = routes
            .lookup("web")
            .map(|r| r.rules.clone())
            .unwrap_or_default();
        let client = config.clusters["self"].endpoints[0]
            .tls
            .as_ref()
            .map(|t| t.config.clone())
            .unwrap_or_else(|| panic!("no client tls"));
        let sink: Arc<dyn DenialSink> = Arc::new(Recorder::default());
        let listener: Arc<str> = Arc::from("in");
        let context = || {
            let check = HandshakeCheck::Rules(rules.clone());
            HandshakeAuthz::new(
                check,
                sink.clone(),
                listener.clone(),
                Some("web".to_owned()),
            )
        };
        let per = |n: u32, started: Instant| started.elapsed().as_nanos() / u128::from(n);

        // The task-local context, set and taken back around a handshake future.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let n = 200_000;
        let started = Instant::now();
        runtime.block_on(async {
            for _ in 0..n {
                let (_, outcome) = context().run(std::future::ready(())).await;
                std::hint::black_box(outcome);
            }
        });
        let scoped = per(n, started);

        // The alternative: a config per connection around a per-connection
        // verifier (here the shared one, which is cheaper than any wrapper),
        // sharing the resolver and the session cache.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let resolver: Arc<dyn ResolvesServerCert> = tls.plain.cert_resolver.clone();
        let verifier = crate::tls::SpiffeClientVerifier::new(
            &std::collections::BTreeMap::new(),
            provider.clone(),
        )
        .unwrap_or_else(|(_, e)| panic!("{e}"));
        let verifier = Arc::new(verifier);
        let n = 20_000;
        let started = Instant::now();
        for _ in 0..n {
            let mut built = ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap_or_else(|e| panic!("{e}"))
                .with_client_cert_verifier(verifier.clone())
                .with_cert_resolver(resolver.clone());
            built.session_storage = tls.plain.session_storage.clone();
            std::hint::black_box(Arc::new(built));
        }
        let per_connection_config = per(n, started);

        // A whole mTLS handshake in memory (TLS 1.3, ECDSA P-256), for scale.
        let n = 300;
        let started = Instant::now();
        for _ in 0..n {
            let name =
                rustls::pki_types::ServerName::try_from("web").unwrap_or_else(|e| panic!("{e}"));
            let mut c =
                ClientConnection::new(client.clone(), name).unwrap_or_else(|e| panic!("{e}"));
            let mut s = ServerConnection::new(tls.plain.clone()).unwrap_or_else(|e| panic!("{e}"));
            HANDSHAKE.sync_scope(context(), || {
                let mut buf = Vec::new();
                while c.is_handshaking() || s.is_handshaking() {
                    buf.clear();
                    while c.wants_write() {
                        c.write_tls(&mut buf).unwrap_or_else(|e| panic!("{e}"));
                    }
                    s.read_tls(&mut buf.as_slice())
                        .unwrap_or_else(|e| panic!("{e}"));
                    s.process_new_packets().unwrap_or_else(|e| panic!("{e}"));
                    buf.clear();
                    while s.wants_write() {
                        s.write_tls(&mut buf).unwrap_or_else(|e| panic!("{e}"));
                    }
                    c.read_tls(&mut buf.as_slice())
                        .unwrap_or_else(|e| panic!("{e}"));
                    c.process_new_packets().unwrap_or_else(|e| panic!("{e}"));
                }
            });
        }
        let handshake = per(n, started);
        println!(
            "per connection: task-local authorization context {scoped} ns; \
             a ServerConfig built per connection {per_connection_config} ns; \
             a whole in-memory mTLS handshake {handshake} ns"
        );
    }

    fn any_id() -> impl Strategy<Value = SpiffeId> {
        ("[ab]", prop::collection::vec("[xyz]", 0..3)).prop_map(|(td, path)| {
            let path: String = path.iter().map(|s| format!("/{s}")).collect();
            id(&format!("spiffe://{td}.mesh{path}"))
        })
    }

    fn any_rule() -> impl Strategy<Value = Rule> {
        let pattern = prop_oneof![
            Just(SpiffePattern::Any),
            any_id().prop_map(SpiffePattern::Exact),
            any_id().prop_map(SpiffePattern::Prefix),
        ];
        (any::<bool>(), pattern).prop_map(|(allow, pattern)| Rule {
            action: if allow { Action::Allow } else { Action::Deny },
            pattern,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Allowed exactly when some allow rule matches and no deny rule
        /// matches before it; rules after the deciding one never matter.
        #[test]
        fn first_matching_rule_decides(
            rules in prop::collection::vec(any_rule(), 0..6),
            later in prop::collection::vec(any_rule(), 0..3),
            caller in any_id(),
        ) {
            let first_allow = rules.iter().position(|r| r.action == Action::Allow && r.pattern.matches(&caller));
            let first_deny = rules.iter().position(|r| r.action == Action::Deny && r.pattern.matches(&caller));
            let expected = match (first_allow, first_deny) {
                (Some(a), Some(d)) => a < d,
                (Some(_), None) => true,
                (None, _) => false,
            };
            let decided = first_allow.is_some() || first_deny.is_some();
            let compiled = Rules::new(rules.clone());
            prop_assert_eq!(compiled.evaluate(&caller).allowed(), expected);
            if decided {
                let mut extended = rules;
                extended.extend(later);
                prop_assert_eq!(Rules::new(extended).evaluate(&caller).allowed(), expected);
            }
        }
    }
}
