//! Forwarding an allowed request's identity to the upstream: the identity
//! headers (`forward`), written through the host, and clients' own copies of
//! them removed.

use crate::claims::Identity;
use crate::config::Forward;
use crate::host::RequestHost;

/// Puts the identity on the request for the upstream. Identity headers come
/// only from tollgate: replaced for callers it identified, removed for
/// anonymous ones, and every other spelling a client sent (`spoofed`)
/// removed. False when any of these host calls failed: the request must then
/// not go on.
pub fn forward_identity(
    h: &mut impl RequestHost,
    forward: &Forward,
    identity: Option<&Identity>,
    spoofed: &[String],
    rewrite: &[(String, Option<Vec<u8>>)],
) -> bool {
    let mut ok = true;
    for name in spoofed {
        ok &= h.set_request_header(name, None);
    }
    let Some(id) = identity else {
        ok &= h.set_request_header(&forward.principal_header, None);
        ok &= h.set_request_header(&forward.attributes_header, None);
        return ok;
    };
    ok &= h.set_request_header(&forward.principal_header, Some(id.principal.as_bytes()));
    if forward.attribute_headers.is_empty() {
        ok &= h.set_request_header(
            &forward.attributes_header,
            Some(id.attributes_header.as_bytes()),
        );
    } else {
        let split = id.split_attributes(&forward.attribute_headers);
        ok &= h.set_request_header(&forward.attributes_header, Some(split.rest.as_bytes()));
        for (header, value) in &split.per_header {
            ok &= h.set_request_header(header, Some(value.as_bytes()));
        }
    }
    if let Some(tenant) = &id.tenant {
        ok &= h.set_request_header(&forward.tenant_header, Some(tenant.as_bytes()));
    }
    if forward.strip_authorization {
        for header in &forward.credential_headers {
            ok &= h.set_request_header(header, None);
        }
        for (name, value) in rewrite {
            ok &= h.set_request_header(name, value.as_deref());
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;

    fn alice() -> Identity {
        Identity {
            principal: "alice".into(),
            attributes: Default::default(),
            attributes_header: r#"{"roles":["alice"]}"#.into(),
            tenant: None,
        }
    }

    /// The header writes, in order: a value set, or `None` for a removal.
    fn written(h: &FakeHost) -> Vec<(&str, Option<&[u8]>)> {
        h.headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect()
    }

    #[test]
    fn identity_headers_are_set_and_other_spellings_removed() {
        let forward = Forward {
            strip_authorization: true,
            ..Forward::default()
        };
        let mut h = FakeHost::default();
        let spoofed = vec![
            "x_auth_principal".to_string(),
            "x-auth_attributes".to_string(),
        ];
        assert!(forward_identity(
            &mut h,
            &forward,
            Some(&alice()),
            &spoofed,
            &[]
        ));
        assert_eq!(
            written(&h),
            vec![
                ("x_auth_principal", None),
                ("x-auth_attributes", None),
                ("x-auth-principal", Some(&b"alice"[..])),
                ("x-auth-attributes", Some(&br#"{"roles":["alice"]}"#[..])),
                ("authorization", None),
            ]
        );
        // Anonymous: removed, the Authorization header kept.
        let mut h = FakeHost::default();
        assert!(forward_identity(&mut h, &forward, None, &spoofed, &[]));
        assert!(h
            .headers
            .iter()
            .all(|(k, v)| v.is_none() && k != "authorization"));
        assert_eq!(h.headers.len(), 4);
    }

    #[test]
    fn the_tenant_and_per_category_headers_follow_the_identity() {
        let forward = Forward {
            attribute_headers: vec![
                ("x-teams".into(), "teams".into()),
                ("x-projects".into(), "projects".into()),
            ],
            ..Forward::default()
        };
        let mut attributes = crate::claims::Attributes::new();
        attributes.insert("roles".into(), vec!["admin".into()]);
        attributes.insert("teams".into(), vec!["ml".into(), "ops".into()]);
        let id = Identity::new("bob".into(), attributes)
            .unwrap()
            .with_tenant(Some("acme".into()));
        let mut h = FakeHost::default();
        let spoofed = vec!["x-projects".to_string(), "x-auth-tenant".to_string()];
        assert!(forward_identity(&mut h, &forward, Some(&id), &spoofed, &[]));
        assert_eq!(
            written(&h),
            vec![
                ("x-projects", None),
                ("x-auth-tenant", None),
                ("x-auth-principal", Some(&b"bob"[..])),
                ("x-auth-attributes", Some(&br#"{"roles":["admin"]}"#[..])),
                ("x-teams", Some(&br#"["ml","ops"]"#[..])),
                ("x-auth-tenant", Some(&b"acme"[..])),
            ]
        );
    }

    #[test]
    fn a_failed_identity_header_write_refuses_the_request() {
        let forward = Forward::default();
        for failing in ["x-auth-principal", "x-auth-attributes", "x_auth_principal"] {
            for identity in [Some(alice()), None] {
                let mut h = FakeHost {
                    failing: vec![failing],
                    ..FakeHost::default()
                };
                let spoofed = vec!["x_auth_principal".to_string()];
                assert!(
                    !forward_identity(&mut h, &forward, identity.as_ref(), &spoofed, &[]),
                    "{failing} {identity:?}"
                );
            }
        }
        let mut h = FakeHost {
            failing: vec!["authorization"],
            ..FakeHost::default()
        };
        let strip = Forward {
            strip_authorization: true,
            ..Forward::default()
        };
        assert!(!forward_identity(&mut h, &strip, Some(&alice()), &[], &[]));
    }
}
