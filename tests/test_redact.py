from urllib.parse import quote

from replay_defs.core.redact import redact, register_url


def test_passwords_in_urls_are_masked_and_the_rest_kept():
    assert redact("redis://:secret@127.0.0.1:6379/0 down") == "redis://:***@127.0.0.1:6379/0 down"
    # (a user named like a registered password would be masked too: that is masking by value)
    assert (
        redact("https://user:pass@host/x and amqp://app:brokerpw@h:5672/%2F")
        == "https://user:***@host/x and amqp://app:***@h:5672/%2F"
    )
    assert redact("amqp://h:5672/ no credentials") == "amqp://h:5672/ no credentials"


def test_registered_passwords_are_masked_by_value_in_any_form():
    pw = "T0p@se:cr/et-917"
    register_url(f"amqp:/guest:{quote(pw, safe='')}@127.0.0.1:5672/%2F")  # mistyped scheme: still parsed
    for text in (
        f"vhost guest:{pw}@127.0.0.1 not found",
        f"amqp://guest:{pw}@h/",
        f"got {quote(pw, safe='')}",
        f"postgresql:/u:{pw}@h/db",
    ):
        masked = redact(text)
        assert pw not in masked and quote(pw, safe="") not in masked and "se:cr" not in masked and "***" in masked, (
            masked
        )
    # (the user is kept unless it is itself a registered password, as "guest" of amqp://guest:guest@ is)
    assert redact(f"vhost replayer:{pw}@127.0.0.1 not found") == "vhost replayer:***@127.0.0.1 not found"


def test_a_raw_at_sign_in_an_unregistered_password_leaves_no_tail():
    assert redact("redis://:p@ss@w0rd@db.internal:6379/0 refused") == "redis://:***@db.internal:6379/0 refused"


def test_conninfo_passwords_and_short_values():
    register_url("host=h user=u password='it\\'s a long one' dbname=d")  # libpq: quoted, backslash escapes a quote
    assert "long one" not in redact("password: it's a long one")
    register_url("redis://:abc@h:6379/0")  # shorter than 4 characters: not masked by value (documented)
    assert redact("abc def") == "abc def" and redact("redis://:abc@h:6379/0") == "redis://:***@h:6379/0"
