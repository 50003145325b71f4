from compare_fakes import fake_compare, fake_trainer  # noqa: F401  (fixtures)
