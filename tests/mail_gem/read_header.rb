# Reads messages the way GitLab's receiver does (Ruby's mail gem) and prints what routing sees in each:
# one JSON request per line on stdin ({"raw": base64}), one JSON answer per line on stdout.
# Driven by tests/test_mail_gem.py, which compares the answers with the gateway's own reading.
require 'base64'
require 'json'
require 'mail'

$stderr.reopen(File::NULL) # the gem warns on stderr about every field it skips
$stdout.sync = true

RAW_FIELDS = %w[Delivered-To X-Delivered-To Envelope-To X-Envelope-To Received X-Original-To X-Forwarded-To
                Auto-Submitted X-Autoreply].freeze

def plain(value)
  value.is_a?(Array) ? value.to_a : value
end

$stdin.each_line do |line|
  raw = Base64.decode64(JSON.parse(line).fetch('raw')).force_encoding(Encoding::UTF_8)
  answer =
    begin
      mail = Mail.new(raw)
      {
        'version' => Mail::VERSION.version,
        'to' => plain(mail.to),
        'cc' => plain(mail.cc),
        'references' => plain(mail.references),
        'fields' => RAW_FIELDS.to_h { |name| [name, Array(mail.header[name]).map(&:value)] }
      }
    rescue StandardError => e
      { 'error' => e.class.name }
    end
  puts JSON.generate(answer)
end
