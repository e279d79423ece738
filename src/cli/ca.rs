//! `sidekey ca init`: creates the local CA that HTTPS interception signs its leaves with,
//! name-constrained to the vendors' DNS suffixes (docs/interception.md).

use std::path::PathBuf;
use std::sync::Arc;

use clap::Subcommand;

use crate::intercept::ca;
use crate::tenants::M3terCreds;
use crate::vendors::Registry;
use crate::vendors::m3ter::{BearerToken, TokenError, TokenSource};

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create DIR/ca.pem and DIR/ca.key (mode 0600) for --intercept-ca-cert/-key: an ECDSA
    /// P-256 CA whose name constraints permit only the vendors' domains. Existing files are
    /// never overwritten.
    Init {
        /// Directory for ca.pem and ca.key (created if absent).
        #[arg(long)]
        out: PathBuf,
    },
}

/// The DNS names a CA made by `ca init` permits: every vendor's [`dns_suffixes`].
///
/// [`dns_suffixes`]: crate::vendors::Vendor::dns_suffixes
pub fn permitted_domains() -> Vec<&'static str> {
    /// The registry is only asked for names here; m3ter never wants a token.
    struct NoTokens;
    #[async_trait::async_trait]
    impl TokenSource for NoTokens {
        async fn token(&self, _: &M3terCreds) -> Result<BearerToken, TokenError> {
            Err(TokenError {
                message: "no token exchange in `sidekey ca`".to_owned(),
            })
        }
        fn refused(&self, _: &M3terCreds, _: &BearerToken) {}
    }
    Registry::new(Arc::new(NoTokens)).dns_suffixes()
}

/// Runs a CA command; the lines to print, or the error.
pub fn run(command: CaCommand) -> Result<String, String> {
    match command {
        CaCommand::Init { out } => {
            let domains = permitted_domains();
            let (cert, key) = ca::init(&out, &domains).map_err(|e| e.to_string())?;
            Ok(format!(
                "created {} and {} (permitted domains: {})\n\
                 serve with: --intercept-ca-cert {} --intercept-ca-key {}\n\
                 give apps only the certificate, {}, as an extra trusted CA",
                cert.display(),
                key.display(),
                domains.join(", "),
                cert.display(),
                key.display(),
                cert.display(),
            ))
        }
    }
}
