"""The hostile-input corpus: events, URLs, origin responses and images, each with the one
outcome the service must give it ("suggested" or the dead-letter reason).

Everything is generated at test time (nothing binary is committed). The end-to-end test in
tests/integration/hostile sends the whole corpus through one service process; the checks
in tests/corpus bound the decode time and memory of every image; the fuzzers in fuzz/
start from it as their seed corpus.
"""

SUGGESTED = "suggested"
