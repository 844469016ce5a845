"""The test suite; its folders mirror the subpackages of fragment_llm/."""
