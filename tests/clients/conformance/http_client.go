// A conformance client in Go: net/http, as a Go program makes its requests
// (the standard library only).
//
//	conformance-go SCENARIO HOST PORT CELL N FILE RATE
//
// SCENARIO is one of small, download, upload, rst-blocked, rst-mid,
// slow-reader; N is the size it moves, FILE holds the bytes an upload sends
// (its first N), RATE the reading rate in bytes per second (0: as fast as
// possible). It prints one line, the format of
// tests/clients/conformance/client.py, and exits 0:
//
//	RESULT STATUS BYTES SHA256 DETAIL
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	scenario, host, port, cell := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
	n, _ := strconv.ParseInt(os.Args[5], 10, 64)
	file := os.Args[6]
	rate, _ := strconv.ParseInt(os.Args[7], 10, 64)

	h := sha256.New()
	got := int64(0)
	start := time.Now()
	finish := func(status, detail string) {
		detail = strings.Join(strings.Fields(detail), " ")
		if detail == "" {
			detail = "-"
		}
		fmt.Printf("RESULT %s %d %s %s\n", status, got, hex.EncodeToString(h.Sum(nil)), detail)
		os.Exit(0)
	}

	base := "http://" + net.JoinHostPort(host, port) + "/c/" + cell + "/"
	var req *http.Request
	var err error
	switch scenario {
	case "small":
		req, err = http.NewRequest("GET", base+"small", nil)
	case "download", "slow-reader":
		req, err = http.NewRequest("GET", base+"download/"+strconv.FormatInt(n, 10), nil)
	case "rst-blocked":
		req, err = http.NewRequest("GET", base+"reset-idle", nil)
	case "rst-mid":
		req, err = http.NewRequest("GET", base+"reset-mid/"+strconv.FormatInt(n, 10), nil)
	case "upload":
		f, ferr := os.Open(file)
		if ferr != nil {
			finish("error", "open: "+ferr.Error())
		}
		req, err = http.NewRequest("POST", base+"upload", io.LimitReader(f, n))
		if req != nil {
			req.ContentLength = n
		}
	default:
		finish("error", "unknown scenario "+scenario)
	}
	if err != nil {
		finish("error", "request: "+err.Error())
	}

	// No proxy from the environment: the connection is the app's own.
	client := &http.Client{Transport: &http.Transport{Proxy: nil}}
	resp, err := client.Do(req)
	if err != nil {
		finish(classify(err), "do: "+err.Error())
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		finish("error", "status "+resp.Status)
	}
	chunk := 256 * 1024
	if rate > 0 {
		chunk = 16 * 1024
	}
	buf := make([]byte, chunk)
	for {
		r, err := resp.Body.Read(buf)
		h.Write(buf[:r])
		got += int64(r)
		if rate > 0 {
			due := start.Add(time.Duration(got * int64(time.Second) / rate))
			time.Sleep(time.Until(due))
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			finish(classify(err), "read: "+err.Error())
		}
	}
	if resp.ContentLength >= 0 && got < resp.ContentLength {
		finish("eof", fmt.Sprintf("read: clean EOF after %d of %d body bytes", got, resp.ContentLength))
	}
	finish("ok", "-")
}

// classify says how an exchange ended from the error net/http returned.
func classify(err error) string {
	switch {
	case errors.Is(err, syscall.ECONNRESET):
		return "reset"
	case errors.Is(err, syscall.EAGAIN):
		return "eagain"
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return "eof"
	}
	return "error"
}
