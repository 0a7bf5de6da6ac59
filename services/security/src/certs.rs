//! A cluster CA and one identity per role, as `chatctl certs`, `chatctl
//! local up` and `deploy/up.sh` make them.
//!
//! Layout of the directory written by [`CertSet::write`]:
//!
//! ```text
//! ca.crt, ca.key          the CA (keep ca.key off the servers)
//! <role>/ca.crt           the CA again, so each role's directory stands alone
//! <role>/tls.crt          the role's certificate, valid for <role>.chat.internal
//! <role>/tls.key
//! public/ca.crt, public/tls.crt, public/tls.key
//!                         the gateways' public port: valid for localhost,
//!                         127.0.0.1, ::1 and the names given
//! ```

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::{CA_FILE, CERT_FILE, Error, KEY_FILE, Role};

/// How long the CA and the identities are valid.
pub const CA_VALIDITY_DAYS: i64 = 3650;
pub const IDENTITY_VALIDITY_DAYS: i64 = 365;

/// One identity as PEM text.
#[derive(Clone)]
pub struct IdentityPem {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

/// A CA, an identity for every role, and the gateways' public
/// certificate.
pub struct CertSet {
    ca_cert: String,
    ca_key: String,
    identities: Vec<(Role, IdentityPem)>,
    public: IdentityPem,
}

/// The directory of the public certificate in a written set.
pub const PUBLIC_DIR: &str = "public";
/// Names the public certificate is always valid for.
pub const PUBLIC_DEFAULT_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

fn failed(what: &str) -> impl Fn(rcgen::Error) -> Error + '_ {
    move |e| Error(format!("cannot make {what}: {e}"))
}

/// Makes a new CA and one identity per role; the public certificate is
/// valid for the default names only.
pub fn generate() -> Result<CertSet, Error> {
    generate_with(&[])
}

/// Makes a new CA, one identity per role, and a public certificate valid
/// for the default names and `public_names` (DNS names or IP addresses
/// clients reach the gateways by).
pub fn generate_with(public_names: &[String]) -> Result<CertSet, Error> {
    let now = OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate().map_err(failed("the CA key"))?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(failed("the CA"))?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "chat cluster CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // A little slack for clocks that disagree.
    ca.not_before = now - Duration::hours(1);
    ca.not_after = now + Duration::days(CA_VALIDITY_DAYS);
    let ca_cert = ca.self_signed(&ca_key).map_err(failed("the CA"))?;
    let ca_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);
    let mut identities = Vec::new();
    for role in Role::ALL {
        let key = KeyPair::generate().map_err(failed("a key"))?;
        let mut p = CertificateParams::new(vec![role.dns_name().to_owned()])
            .map_err(failed(role.name()))?;
        p.distinguished_name
            .push(DnType::CommonName, role.dns_name());
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = now - Duration::hours(1);
        p.not_after = now + Duration::days(IDENTITY_VALIDITY_DAYS);
        let cert = p.signed_by(&key, &issuer).map_err(failed(role.name()))?;
        identities.push((
            role,
            IdentityPem {
                ca: ca_pem.clone(),
                cert: cert.pem(),
                key: key.serialize_pem(),
            },
        ));
    }
    let key = KeyPair::generate().map_err(failed("a key"))?;
    let mut names: Vec<String> = PUBLIC_DEFAULT_NAMES.iter().map(|n| n.to_string()).collect();
    names.extend(public_names.iter().cloned());
    names.dedup();
    let mut p = CertificateParams::new(names).map_err(failed("the public certificate"))?;
    p.distinguished_name
        .push(DnType::CommonName, "chat gateways");
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(IDENTITY_VALIDITY_DAYS);
    let cert = p
        .signed_by(&key, &issuer)
        .map_err(failed("the public certificate"))?;
    let public = IdentityPem {
        ca: ca_pem.clone(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    };
    Ok(CertSet {
        ca_cert: ca_pem,
        ca_key: ca_key_pem,
        identities,
        public,
    })
}

impl std::fmt::Debug for CertSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSet").finish_non_exhaustive()
    }
}

impl CertSet {
    pub fn identity(&self, role: Role) -> &IdentityPem {
        &self
            .identities
            .iter()
            .find(|(r, _)| *r == role)
            .expect("every role has an identity")
            .1
    }

    /// The gateways' public certificate.
    pub fn public(&self) -> &IdentityPem {
        &self.public
    }

    /// The identity of `role`, ready to serve and dial with.
    pub fn tls(&self, role: Role) -> std::sync::Arc<crate::Tls> {
        let id = self.identity(role);
        crate::Tls::from_pem(
            role,
            id.ca.clone().into(),
            id.cert.clone().into(),
            id.key.clone().into(),
        )
        .expect("a generated identity is valid")
    }

    /// Writes the set under `dir` (created if missing); keys are readable
    /// by their owner only.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        write_file(&dir.join(CA_FILE), &self.ca_cert, false)?;
        write_file(&dir.join("ca.key"), &self.ca_key, true)?;
        for (role, id) in &self.identities {
            let d = dir.join(role.name());
            write_file(&d.join(CA_FILE), &id.ca, false)?;
            write_file(&d.join(CERT_FILE), &id.cert, false)?;
            write_file(&d.join(KEY_FILE), &id.key, true)?;
        }
        let d = dir.join(PUBLIC_DIR);
        write_file(&d.join(CA_FILE), &self.public.ca, false)?;
        write_file(&d.join(CERT_FILE), &self.public.cert, false)?;
        write_file(&d.join(KEY_FILE), &self.public.key, true)?;
        Ok(())
    }
}

/// Whether `dir` already holds a CA and every role's identity.
pub fn complete(dir: &Path) -> bool {
    dir.join(CA_FILE).is_file()
        && Role::ALL
            .iter()
            .map(|r| r.name())
            .chain([PUBLIC_DIR])
            .all(|d| {
                [CA_FILE, CERT_FILE, KEY_FILE]
                    .iter()
                    .all(|f| dir.join(d).join(f).is_file())
            })
}

fn write_file(path: &Path, text: &str, secret: bool) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |e: std::io::Error| Error(format!("cannot write {}: {e}", path.display()));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(fail)?;
    }
    let mode = if secret { 0o600 } else { 0o644 };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(fail)?;
    f.write_all(text.as_bytes()).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}
