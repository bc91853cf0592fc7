## An Omnibus /etc/gitlab/gitlab.rb, for `lmtp-gateway config import`: the incoming_email and service_desk_email
## lines are those of omnibus-gitlab's files/gitlab-config-template/gitlab.rb.template and of GitLab's
## "Incoming email" / "Service Desk" documentation, uncommented and filled in. Passwords are placeholders.

external_url 'https://gitlab.example.com'

# gitlab_rails['gitlab_ssh_host'] = 'ssh.host_example.com'
gitlab_rails['time_zone'] = 'UTC'

### GitLab email server settings
gitlab_rails['smtp_enable'] = true
gitlab_rails['smtp_address'] = "smtp.server"
gitlab_rails['smtp_port'] = 465
gitlab_rails['smtp_password'] = File.read('/etc/gitlab/smtp_password').strip

### Content Security Policy
gitlab_rails['content_security_policy'] = {
 'enabled' => false,
 'report_only' => false,
 # Each directive is a String (e.g. "'self'").
 'directives' => {
   'base_uri' => nil,
   'child_src' => nil,
 }
}

### Reply by email
###! Allow users to comment on issues and merge requests by replying to
###! notification emails.
###! Docs: https://docs.gitlab.com/ee/administration/reply_by_email.html
gitlab_rails['incoming_email_enabled'] = true

#### Incoming Email Address
####! The email address including the `%{key}` placeholder that will be replaced
####! to reference the item being replied to.
gitlab_rails['incoming_email_address'] = "incoming+%{key}@incoming.example.com"

#### Email account username
gitlab_rails['incoming_email_email'] = "incoming@incoming.example.com"

#### Email account password
gitlab_rails['incoming_email_password'] = "[REDACTED]"

#### IMAP Settings
gitlab_rails['incoming_email_host'] = "imap.incoming.example.com"
gitlab_rails['incoming_email_port'] = 993
gitlab_rails['incoming_email_ssl'] = true
gitlab_rails['incoming_email_start_tls'] = false

#### Incoming Mailbox Settings (via `mail_room`)
####! The mailbox where incoming mail will end up. Usually "inbox".
gitlab_rails['incoming_email_mailbox_name'] = "inbox"
####! The IDLE command timeout.
gitlab_rails['incoming_email_idle_timeout'] = 60
####! The file name for internal `mail_room` JSON logfile
gitlab_rails['incoming_email_log_file'] = "/var/log/gitlab/mailroom/mail_room_json.log"
####! Permanently remove messages from the mailbox when they are marked as deleted after delivery
gitlab_rails['incoming_email_expunge_deleted'] = false

#### How incoming emails are delivered to Rails process. Accept either sidekiq
#### or webhook. The default config is sidekiq.
gitlab_rails['incoming_email_delivery_method'] = "sidekiq"

################################################################################
## Service desk email settings
################################################################################
gitlab_rails['service_desk_email_enabled'] = true
gitlab_rails['service_desk_email_address'] = "contact+%{key}@example.onmicrosoft.com"
gitlab_rails['service_desk_email_email'] = "contact@example.onmicrosoft.com"
gitlab_rails['service_desk_email_delete_after_delivery'] = false

#### Inbox options (for Microsoft Graph)
gitlab_rails['service_desk_email_inbox_method'] = 'microsoft_graph'
gitlab_rails['service_desk_email_inbox_options'] = {
   'tenant_id': 'YOUR-TENANT-ID',
   'client_id': 'YOUR-CLIENT-ID',
   'client_secret': 'YOUR-CLIENT-SECRET',
   'poll_interval': 60  # Optional
}
gitlab_rails['service_desk_email_delivery_method'] = "sidekiq"

### GitLab Redis settings
###! Connect to your own Redis instance
###! Docs: https://docs.gitlab.com/omnibus/settings/redis.html
redis['enable'] = false
gitlab_rails['redis_host'] = "redis.example.com"
gitlab_rails['redis_port'] = 6379
gitlab_rails['redis_ssl'] = false
gitlab_rails['redis_password'] = nil
gitlab_rails['redis_database'] = 0

roles ['application_role']
nginx['custom_gitlab_server_config'] = "location ^~ /foo-namespace/bar-project/raw/ {\n deny all;\n}\n"
