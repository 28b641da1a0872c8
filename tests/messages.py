"""Chat messages in one call each, for tests: U("hi") is {"role": "user", "content": "hi"}."""


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}
