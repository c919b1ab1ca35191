//! OGX's `github_token` provider (`ogx/core/server/auth_providers.py`
//! `GitHubTokenAuthProvider`, `_get_github_user_info`,
//! `_fetch_github_organizations`, ogx 1.5.0): a GitHub personal access or
//! OAuth token is valid when `GET <github_api_base_url>/user` accepts it
//! (GitHub REST "Get the authenticated user"); the organisations come from
//! `GET /user/orgs?per_page=100&page=N` ("List organizations for the
//! authenticated user"), page after page while a page is full, at most
//! [`MAX_ORG_PAGES`]. The principal is `login`; the attributes are
//! `claims_mapping` over `{"login", "id" (as a string), "organizations"}`
//! (OGX's default: `login` → `roles`, `organizations` → `teams`).
//!
//! Answers: `/user` 200 with a string `login` → on to the organisations;
//! 401 or 403 → 401 with OGX's message; rate limited (429, or 403 with
//! `x-ratelimit-remaining: 0` or `retry-after`, GitHub's "Rate limits for
//! the REST API") → 503, as are 5xx, no answer and timeouts. Unlike OGX,
//! which goes on without organisations when their call fails, a failed
//! organisations call is a 503: attributes that are missing could grant
//! what an `unless` condition would refuse.

use super::{api_endpoint, http_outcome, Answer, CalloutRequest, Method, ProviderError, Upstream};
use crate::claims::{ClaimsMapping, Identity};
use crate::json::{ConfigError, Obj};
use serde_json::{Map, Value};

/// The 401 for a request without a token (OGX's `get_auth_error_message`).
pub const MISSING: &str = "Authentication required. Please provide a valid GitHub access token (https://docs.github.com/en/authentication/keeping-your-account-and-data-secure/managing-your-personal-access-tokens) in the Authorization header (Bearer <token>)";
/// OGX's default `github_api_base_url`.
pub const DEFAULT_API_BASE: &str = "https://api.github.com";
/// Default `cache_ttl` (seconds) of an accepted token.
pub const DEFAULT_CACHE_TTL: u64 = 60;
/// Organisations asked per page (OGX's `per_page`).
pub const ORGS_PER_PAGE: usize = 100;
/// Organisation pages read at most: the first 1,000 organisations.
pub const MAX_ORG_PAGES: u32 = 10;

/// `github_token`.
#[derive(Debug, Clone)]
pub struct GitHub {
    /// `<base>/user`; the organisations are at `<base path>/user/orgs`.
    pub endpoint: Upstream,
    orgs_path: String,
    pub claims_mapping: ClaimsMapping,
    /// Seconds an accepted token is cached (0: never).
    pub cache_ttl: u64,
}

/// A token's exchange so far: the token (for the next call), the user,
/// the organisations read and the page asked last (0: `/user`).
#[derive(Clone, PartialEq, Eq)]
pub struct Progress {
    token: String,
    login: String,
    id: String,
    organizations: Vec<String>,
    page: u32,
}

/// Redacts the token.
impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("login", &self.login)
            .field("organizations", &self.organizations.len())
            .field("page", &self.page)
            .finish()
    }
}

/// What an answer leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Ask for this page of organisations next.
    Next(Box<Progress>, CalloutRequest),
    /// The caller's identity.
    Done(Identity),
}

fn headers(token: &str) -> Vec<(String, String)> {
    vec![
        ("authorization".into(), format!("Bearer {token}")),
        ("accept".into(), "application/vnd.github.v3+json".into()),
        // GitHub refuses requests without one.
        ("user-agent".into(), "tollgate".into()),
    ]
}

impl GitHub {
    pub fn parse(mut o: Obj) -> Result<GitHub, ConfigError> {
        let endpoint = api_endpoint(&mut o, "github_api_base_url", DEFAULT_API_BASE, "/user")?;
        let orgs_path = format!("{}/orgs", endpoint.path);
        let claims_mapping = match o.obj("claims_mapping")? {
            Some(m) => ClaimsMapping::parse(m)?,
            // OGX's default, in its order.
            None => ClaimsMapping::from_pairs(&[("login", "roles"), ("organizations", "teams")]),
        };
        let cache_ttl = o
            .u64_max("cache_ttl", super::MAX_CACHE_TTL)?
            .unwrap_or(DEFAULT_CACHE_TTL);
        o.finish()?;
        Ok(GitHub {
            endpoint,
            orgs_path,
            claims_mapping,
            cache_ttl,
        })
    }

    /// `GET /user` with the caller's token, and the exchange it starts.
    pub fn start(&self, token: &str) -> (CalloutRequest, Box<Progress>) {
        let request = CalloutRequest {
            method: Method::Get,
            path: None,
            headers: headers(token),
            body: Vec::new(),
        };
        let progress = Progress {
            token: token.to_string(),
            login: String::new(),
            id: String::new(),
            organizations: Vec::new(),
            page: 0,
        };
        (request, Box::new(progress))
    }

    fn orgs_request(&self, token: &str, page: u32) -> CalloutRequest {
        CalloutRequest {
            method: Method::Get,
            path: Some(format!(
                "{}?per_page={ORGS_PER_PAGE}&page={page}",
                self.orgs_path
            )),
            headers: headers(token),
            body: Vec::new(),
        }
    }

    /// Reads the answer to the call `progress` made last: `/user`, or a
    /// page of organisations.
    pub fn interpret(
        &self,
        answer: Answer,
        mut progress: Box<Progress>,
    ) -> Result<Step, ProviderError> {
        if matches!(answer, Answer::Throttled { .. }) {
            log::warn!("the GitHub API rate-limited tollgate's call");
            return Err(ProviderError::Unavailable);
        }
        let (status, body) = http_outcome(answer)?;
        if progress.page == 0 {
            match status {
                200 => {}
                401 | 403 => return Err(ProviderError::GitHubInvalid),
                other => {
                    log::warn!("GitHub /user answered {other}");
                    return Err(ProviderError::Unavailable);
                }
            }
            let user = match crate::json::parse_strict(body) {
                Ok(Value::Object(user)) => user,
                _ => return Err(ProviderError::GitHubUser),
            };
            let login = match user.get("login") {
                Some(Value::String(l)) if !l.is_empty() => l.clone(),
                _ => return Err(ProviderError::GitHubUser),
            };
            let id = match user.get("id") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => return Err(ProviderError::GitHubUser),
            };
            progress.login = login;
            progress.id = id;
            progress.page = 1;
            let next = self.orgs_request(&progress.token, 1);
            return Ok(Step::Next(progress, next));
        }
        if status != 200 {
            log::warn!("GitHub /user/orgs answered {status}");
            return Err(ProviderError::Unavailable);
        }
        let Ok(Value::Array(orgs)) = crate::json::parse_strict(body) else {
            log::warn!("GitHub /user/orgs answered something other than a list");
            return Err(ProviderError::Unavailable);
        };
        let full = orgs.len() >= ORGS_PER_PAGE;
        for org in orgs {
            if let Some(Value::String(login)) = org.get("login") {
                if !progress.organizations.contains(login) {
                    progress.organizations.push(login.clone());
                }
            }
        }
        if full && progress.page < MAX_ORG_PAGES {
            progress.page = progress.page.saturating_add(1);
            let next = self.orgs_request(&progress.token, progress.page);
            return Ok(Step::Next(progress, next));
        }
        self.identity(*progress).map(Step::Done)
    }

    fn identity(&self, p: Progress) -> Result<Identity, ProviderError> {
        let mut data = Map::new();
        data.insert("login".into(), Value::String(p.login.clone()));
        data.insert("id".into(), Value::String(p.id));
        data.insert(
            "organizations".into(),
            Value::Array(p.organizations.into_iter().map(Value::String).collect()),
        );
        let attributes = self.claims_mapping.apply(&data);
        Identity::new(p.login, attributes).map_err(|_| ProviderError::GitHubUser)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<GitHub, ConfigError> {
        GitHub::parse(Obj::new(&v, "auth.provider_config").unwrap())
    }

    fn ok(body: &str) -> Answer<'_> {
        Answer::Response {
            status: 200,
            body: body.as_bytes(),
        }
    }

    fn orgs(from: usize, n: usize) -> String {
        let list: Vec<Value> = (from..from + n)
            .map(|i| json!({"login": format!("org{i}"), "id": i}))
            .collect();
        Value::Array(list).to_string()
    }

    /// Runs a whole exchange: `/user`, then the pages given.
    fn run(
        g: &GitHub,
        user: Answer,
        pages: &[Answer],
    ) -> (Result<Identity, ProviderError>, Vec<String>) {
        let mut asked = Vec::new();
        let (_, start) = g.start("tok");
        let mut step = g.interpret(user, start);
        let mut pages = pages.iter();
        loop {
            match step {
                Ok(Step::Done(id)) => return (Ok(id), asked),
                Err(e) => return (Err(e), asked),
                Ok(Step::Next(p, req)) => {
                    assert_eq!(req.method, Method::Get);
                    assert_eq!(req.headers[0].1, "Bearer tok");
                    assert!(!format!("{p:?}").contains("tok"));
                    asked.push(req.path.clone().unwrap());
                    let Some(a) = pages.next() else {
                        panic!("page {} not scripted", asked.len())
                    };
                    step = g.interpret(*a, p);
                }
            }
        }
    }

    #[test]
    fn ogx_defaults_and_the_requests() {
        let g = parse(json!({})).unwrap();
        assert_eq!(g.endpoint.url, "https://api.github.com/user");
        assert_eq!(g.endpoint.cluster, "api.github.com");
        let (r, _) = g.start("tok");
        assert_eq!(r.method, Method::Get);
        assert_eq!(r.path, None);
        assert!(r.body.is_empty());
        assert_eq!(r.headers[0], ("authorization".into(), "Bearer tok".into()));
        assert!(r
            .headers
            .contains(&("accept".into(), "application/vnd.github.v3+json".into())));
        assert!(!format!("{r:?}").contains("tok"));
        let g =
            parse(json!({"github_api_base_url": "https://ghe.example/api/v3/", "cluster": "ghe"}))
                .unwrap();
        assert_eq!(g.endpoint.path, "/api/v3/user");
        assert_eq!(g.endpoint.cluster, "ghe");
        assert_eq!(
            g.orgs_request("t", 2).path.unwrap(),
            "/api/v3/user/orgs?per_page=100&page=2"
        );
        for (bad, key) in [
            (
                json!({"github_api_base_url": "ftp://x"}),
                "github_api_base_url",
            ),
            (json!({"github_api_base": "https://x"}), "github_api_base"),
            (json!({"cache_ttl": -1}), "cache_ttl"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("auth.provider_config.{key}")), "{e}");
        }
    }

    #[test]
    fn answers_are_read_as_ogx_reads_them() {
        let g = parse(json!({})).unwrap();
        let user = ok(r#"{"login": "octocat", "id": 583231, "name": "The Octocat"}"#);
        let page = orgs(0, 3);
        let (id, asked) = run(&g, user, &[ok(&page)]);
        let id = id.unwrap();
        assert_eq!(asked, ["/user/orgs?per_page=100&page=1"]);
        assert_eq!(id.principal, "octocat");
        assert_eq!(id.attributes["roles"], ["octocat"]);
        assert_eq!(id.attributes["teams"], ["org0", "org1", "org2"]);
        // No organisations: no `teams` (OGX keeps `teams: []`; no rule tells them apart).
        let (id, _) = run(&g, user, &[ok("[]")]);
        assert!(!id.unwrap().attributes.contains_key("teams"));
        // `id` as a string, for a custom mapping.
        let g2 = parse(json!({"claims_mapping": {"id": "namespaces"}})).unwrap();
        let (id, _) = run(&g2, user, &[ok("[]")]);
        assert_eq!(id.unwrap().attributes["namespaces"], ["583231"]);
    }

    #[test]
    fn pages_are_read_while_full_up_to_the_cap() {
        let g = parse(json!({})).unwrap();
        let user = ok(r#"{"login": "octocat", "id": 1}"#);
        let (p1, p2) = (orgs(0, 100), orgs(100, 3));
        let (id, asked) = run(&g, user, &[ok(&p1), ok(&p2)]);
        assert_eq!(asked.len(), 2);
        assert!(asked[1].ends_with("page=2"));
        assert_eq!(id.unwrap().attributes["teams"].len(), 103);
        // Overlapping pages: duplicates dropped, order kept.
        let (id, _) = run(&g, user, &[ok(&p1), ok(&orgs(99, 2))]);
        assert_eq!(id.unwrap().attributes["teams"].len(), 101);
        let full: Vec<String> = (0..12).map(|i| orgs(i * 100, 100)).collect();
        let answers: Vec<Answer> = full.iter().map(|p| ok(p)).collect();
        let (id, asked) = run(&g, user, &answers);
        assert_eq!(asked.len(), MAX_ORG_PAGES as usize);
        assert_eq!(id.unwrap().attributes["teams"].len(), 1000);
    }

    #[test]
    fn refusals_and_failures() {
        let g = parse(json!({})).unwrap();
        let user = ok(r#"{"login": "octocat", "id": 1}"#);
        let status = |s: u16| Answer::Response {
            status: s,
            body: b"{}",
        };
        let e = |a: Answer| run(&g, a, &[]).0.unwrap_err();
        assert_eq!(
            e(status(401)).to_string(),
            "GitHub token validation failed. Please check your token and try again."
        );
        assert_eq!(e(status(401)).status(), 401);
        assert_eq!(e(status(403)), ProviderError::GitHubInvalid);
        let throttled = Answer::Throttled {
            status: 403,
            body: b"{}",
        };
        assert_eq!(e(throttled), ProviderError::Unavailable);
        assert_eq!(e(status(404)), ProviderError::Unavailable);
        assert_eq!(e(status(502)), ProviderError::Unavailable);
        assert_eq!(e(Answer::TimedOut), ProviderError::Timeout);
        assert_eq!(e(Answer::NoAnswer), ProviderError::Unavailable);
        for bad in [
            "[]",
            "{}",
            r#"{"login": 5, "id": 1}"#,
            r#"{"login": "a"}"#,
            "nope",
        ] {
            assert_eq!(e(ok(bad)), ProviderError::GitHubUser, "{bad}");
        }
        // The organisations failing: 503, never a smaller identity.
        for page in [
            status(403),
            throttled,
            Answer::NoAnswer,
            ok("{}"),
            ok("nope"),
        ] {
            assert_eq!(
                run(&g, user, &[page]).0.unwrap_err(),
                ProviderError::Unavailable
            );
        }
        assert_eq!(
            run(&g, user, &[Answer::TimedOut]).0.unwrap_err(),
            ProviderError::Timeout
        );
        let p1 = orgs(0, 100);
        assert_eq!(
            run(&g, user, &[ok(&p1), status(500)]).0.unwrap_err(),
            ProviderError::Unavailable
        );
    }
}
