"""lmtp-gateway: incoming mail for self-managed GitLab over LMTP."""
