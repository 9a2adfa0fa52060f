"""The HTTP floor of a saga: the same two calls as `bench/saga.py` makes (POST a sale, then
follow its Server-Sent Events to a terminal state) against a FastAPI app that does nothing
else, served the way `magasin up` serves (uvicorn, uvloop, httptools). What one Python
process on this machine can do at best for the HTTP part alone.

    python bench/http_floor.py serve <port>      (run by bench/saga.py)
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator

import orjson
import uvicorn
from fastapi import FastAPI, Header
from fastapi.responses import StreamingResponse
from pydantic import BaseModel


class Line(BaseModel):
    product_id: str
    quantity: int


class Sale(BaseModel):
    store_id: str
    customer_id: str
    payment_method: str
    items: list[Line]


app = FastAPI()


@app.post("/api/transactions", status_code=201)
async def create(sale: Sale, x_api_key: str = Header()) -> dict[str, str]:
    return {"transaction_id": str(uuid.uuid4()), "status": "PENDING"}


@app.get("/api/transactions/{transaction_id}/events")
async def follow(transaction_id: str, x_api_key: str = Header()) -> StreamingResponse:
    async def stream() -> AsyncIterator[bytes]:
        for status in ("PENDING", "COMPLETED"):
            data = {"transaction_id": transaction_id, "status": status}
            yield b"event: status\ndata: " + orjson.dumps(data) + b"\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning",
                loop="uvloop", http="httptools", access_log=False)
