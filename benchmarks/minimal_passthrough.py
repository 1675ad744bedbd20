"""The benchmark's baseline: a minimal grpc.aio ext_proc server that passes everything through.

Headers and trailers get empty answers; FULL_DUPLEX_STREAMED body chunks are sent back as
they came; STREAMED chunks get an empty BodyResponse. Prints "minimal listening on HOST:PORT".

    python benchmarks/minimal_passthrough.py --listen 127.0.0.1:0
"""

import argparse
import asyncio

import grpc
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

FD = ProcessingMode.FULL_DUPLEX_STREAMED
MAX_MESSAGE = 64 * 1024 * 1024


class Passthrough(pb_grpc.ExternalProcessorServicer):
    async def Process(self, requests, context):
        fd = {}
        async for req in requests:
            kind = req.WhichOneof("request")
            if req.HasField("protocol_config"):
                cfg = req.protocol_config
                fd = {"request_body": cfg.request_body_mode == FD, "response_body": cfg.response_body_mode == FD}
            if kind in ("request_headers", "response_headers"):
                yield pb.ProcessingResponse(**{kind: pb.HeadersResponse()})
            elif kind in ("request_body", "response_body"):
                body = getattr(req, kind)
                if fd.get(kind):
                    chunk = pb.StreamedBodyResponse(body=body.body, end_of_stream=body.end_of_stream)
                    common = pb.CommonResponse(body_mutation=pb.BodyMutation(streamed_response=chunk))
                    yield pb.ProcessingResponse(**{kind: pb.BodyResponse(response=common)})
                else:
                    yield pb.ProcessingResponse(**{kind: pb.BodyResponse()})
            elif kind in ("request_trailers", "response_trailers"):
                yield pb.ProcessingResponse(**{kind: pb.TrailersResponse()})


async def main(listen: str) -> None:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
    server = grpc.aio.server(options=options)
    pb_grpc.add_ExternalProcessorServicer_to_server(Passthrough(), server)
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"minimal listening on {listen.rpartition(':')[0]}:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1:9001")
    asyncio.run(main(parser.parse_args().listen))
