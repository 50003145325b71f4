# The fixtures of these tests: pytest finds them here by name.
from compare_fakes import fake_compare, fake_trainer
