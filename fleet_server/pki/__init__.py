"""Device PKI: the fleet's private CA, device certificates, and the broker's mTLS + ACL config."""
