from kmsguard import Guard


def test_round_trip_each_default_classification(guard: Guard) -> None:
    for classification, context in [("general", {}), ("pii", {"user": "7"}), ("payment", {"purpose": "refund"})]:
        sealed = guard.encrypt(b"secret", classification, context)
        assert guard.decrypt(sealed, context) == b"secret"
        assert guard.inspect(sealed).classification == classification
