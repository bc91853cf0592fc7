# Workers named as GitLab's, run by a real Sidekiq (Debian's ruby-sidekiq): each job's argument is read with the
# mail gem, as GitLab's Gitlab::Email::Receiver does, and what a reader of the message would see is written as
# one JSON line to $RECEIVED_LOG for tests/test_eightbit.py to compare with what the sender wrote.
require 'json'
require 'mail'
require 'sidekiq'

$stderr.reopen(File::NULL) if ENV['QUIET_MAIL_WARNINGS'] # the gem warns about every header field it skips

class EmailReceiverWorker
  include Sidekiq::Worker
  sidekiq_options retry: 3

  def perform(raw)
    mail = Mail::Message.new(raw)
    part = mail.multipart? ? (mail.text_part || mail.parts.first) : mail
    seen = {
      'worker' => self.class.name,
      'jid' => jid,
      'utf8' => raw.valid_encoding?,
      'subject' => mail.subject,
      'to' => Array(mail.to),
      'text' => part.decoded,
      'html' => mail.html_part&.decoded
    }
    File.open(ENV.fetch('RECEIVED_LOG'), 'a') { |log| log.puts(JSON.generate(seen)) }
  end
end

class ServiceDeskEmailReceiverWorker < EmailReceiverWorker
end
