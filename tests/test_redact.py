from replay_defs.redact import redact


def test_passwords_in_urls_are_masked_and_the_rest_kept():
    assert redact("redis://:secret@127.0.0.1:6379/0 down") == "redis://:***@127.0.0.1:6379/0 down"
    assert redact("https://user:pass@host/x and amqp://guest:guest@h:5672/%2F") == "https://user:***@host/x and amqp://guest:***@h:5672/%2F"
    assert redact("amqp://h:5672/ no credentials") == "amqp://h:5672/ no credentials"
